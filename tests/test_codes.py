import numpy as np
import pytest

from latenthash.codes import from_words, pack_codes, threshold, to_words, unpack_codes
from latenthash.errors import InvalidInput


@pytest.mark.parametrize("bits", [8, 12, 48, 64, 65, 128, 1024])
def test_round_trips(bits, rng):
    bools = rng.random((37, bits)) < 0.5
    packed = pack_codes(bools, bits)
    assert packed.shape == (37, (bits + 7) // 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(packed, np.packbits(bools, axis=1))  # FAISS / numpy byte layout
    np.testing.assert_array_equal(unpack_codes(packed, bits), bools)
    np.testing.assert_array_equal(pack_codes(bools.astype(np.int32), bits), packed)
    np.testing.assert_array_equal(pack_codes(packed, bits), packed)
    words = to_words(packed, bits)
    assert words.shape == (37, (bits + 63) // 64) and words.dtype == np.uint64
    np.testing.assert_array_equal(from_words(words, bits), packed)


def test_word_layout_preserves_hamming_distance(rng):
    bits = 100
    a, b = (rng.random((50, bits)) < 0.5 for _ in range(2))
    expected = (a != b).sum(1)
    wa, wb = to_words(pack_codes(a, bits), bits), to_words(pack_codes(b, bits), bits)
    np.testing.assert_array_equal(np.bitwise_count(wa ^ wb).sum(1), expected)


def test_single_code_becomes_one_row(rng):
    code = rng.random(48) < 0.5
    assert pack_codes(code, 48).shape == (1, 6)


def test_threshold_at_half():
    probs = np.array([[0.49, 0.5, 0.51, 0.0, 1.0, 0.2, 0.7, 0.9]])
    np.testing.assert_array_equal(unpack_codes(threshold(probs), 8), [[0, 1, 1, 0, 1, 0, 1, 1]])


@pytest.mark.parametrize("bad, message", [
    (np.zeros((3, 47), bool), "do not fit"),
    (np.full((3, 48), 2), "only 0 and 1"),
    (np.zeros((2, 2, 48), bool), "2-D"),
    (np.zeros((3, 6), np.int16), "do not fit"),
])
def test_bad_codes_are_clear_errors(bad, message):
    with pytest.raises(InvalidInput, match=message):
        pack_codes(bad, 48)


def test_padding_bits_must_be_zero():
    packed = np.zeros((1, 2), np.uint8)
    packed[0, 1] = 0b0000_0001  # a 12-bit code uses the top 4 bits of byte 1 only
    with pytest.raises(InvalidInput, match="padding"):
        pack_codes(packed, 12)


@pytest.mark.parametrize("bits", [7, 1025, 48.0, True])
def test_bits_range(bits):
    with pytest.raises(InvalidInput):
        pack_codes(np.zeros((1, 8), bool), bits)
