import numpy as np
import pytest
import torch

from latenthash.errors import DataError, InvalidInput
from latenthash.export.backbones import build_backbone
from latenthash.export.data import Dataset
from latenthash.export.evaluate import evaluate_run
from latenthash.export.model import ExportWrapper, HashNet, ModelConfig
from latenthash.export.train import TrainConfig, default_model_config, load_model, predict, train


@pytest.mark.parametrize("backbone, size, channels", [
    ("cnn", (28, 28), 1), ("cnn", (32, 32), 3), ("resnet18", (32, 32), 3), ("mobilenet_v3_small", (64, 64), 3),
    ("mobilenet_v3_large", (32, 32), 1),
])
def test_shapes(backbone, size, channels):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, bits=24, feature_dim=32, in_channels=channels, image_size=size,
                      mean=(0.5,) * channels, std=(0.25,) * channels)
    net = HashNet(cfg).eval()
    logits, probs, feats = net(torch.randn(3, channels, *size))
    assert logits.shape == (3, 10) and probs.shape == (3, 24) and feats.shape == (3, 32)
    assert ((probs > 0) & (probs < 1)).all()
    out = ExportWrapper(net)(torch.randint(0, 256, (3, *size, channels), dtype=torch.uint8))
    np.testing.assert_allclose(out[1].norm(dim=1).detach().numpy(), 1.0, rtol=1e-5)


def test_pretrained_weights_from_local_file_only(tmp_path):
    ref, _ = build_backbone("resnet18", in_channels=3, image_size=(32, 32))
    state = {k: v + 1 if v.dtype.is_floating_point else v for k, v in ref.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 512)  # the ImageNet classifier: skipped
    torch.save(state, tmp_path / "r18.pth")
    grey, _ = build_backbone("resnet18", in_channels=1, image_size=(32, 32), pretrained=str(tmp_path / "r18.pth"))
    assert torch.equal(grey.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert not torch.equal(grey.conv1.weight, state["conv1.weight"][:, :1])  # other shape: left as initialized
    with pytest.raises(DataError, match="never downloads"):
        build_backbone("resnet18", in_channels=3, image_size=(32, 32), pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(InvalidInput, match="unknown backbone"):
        build_backbone("vgg", in_channels=3, image_size=(32, 32))


def test_short_training_run_beats_chance_and_resumes(fashion, tmp_path):
    """A real 2-epoch run on 3000 Fashion-MNIST images; chance is 10% accuracy and ~0.1 mAP."""
    small = Dataset("fashion-mnist", fashion.train.subset(3000, seed=1), fashion.test.subset(500, seed=1),
                    fashion.class_names)
    mc = default_model_config(small, bits=16, feature_dim=64)
    cfg = TrainConfig(epochs=2, batch_size=64, seed=0)
    train(small, tmp_path / "run", model_config=mc, cfg=TrainConfig(epochs=2, batch_size=64, stop_after=1),
          progress=False)
    with pytest.raises(InvalidInput, match="epochs"):
        train(small, tmp_path / "run", model_config=mc, cfg=TrainConfig(epochs=3), resume=True, progress=False)
    model, cfg = train(small, tmp_path / "run", model_config=mc, cfg=cfg, resume=True, progress=False)
    assert [h["epoch"] for h in cfg.history] == [1, 2]  # epoch 1 from the checkpoint, epoch 2 resumed
    loaded, ckpt = load_model(tmp_path / "run")
    assert ckpt["class_names"][0] == "T-shirt/top" and loaded.config.bits == 16
    p1, f1, _ = predict(model, small.test.images[:50])
    p2, f2, _ = predict(loaded, small.test.images[:50])
    np.testing.assert_allclose(p1, p2, atol=1e-6)
    report = evaluate_run(tmp_path / "run", dataset=small, progress=False)
    assert report["accuracy"] > 0.6
    assert report["map_all"] > 0.4 and report["map_at_1000"] > 0.5
    assert report["baselines"]["lsh"]["16"]["map_all"] > 0.1
    assert all(p.endswith(".png") for p in report["plots"])


def test_clean_epochs_train_on_unaugmented_images(fashion, tmp_path):
    """The last `clean_epochs` see the images as stored: a run made only of clean epochs equals a run with no
    augmentation at all, weight for weight, and differs from the same run with flips."""
    small = Dataset("fashion-mnist", fashion.train.subset(256, seed=2), fashion.test.subset(64, seed=2),
                    fashion.class_names)
    mc = default_model_config(small, bits=16, feature_dim=32)

    def weights(name: str, **options) -> dict:
        model, _ = train(small, tmp_path / name, model_config=mc, cfg=TrainConfig(epochs=1, batch_size=32, **options),
                         progress=False)
        return model.state_dict()

    clean = weights("clean", clean_epochs=1)
    plain = weights("plain", clean_epochs=0, hflip=False)
    flipped = weights("flipped", clean_epochs=0)
    assert all(torch.equal(clean[k], plain[k]) for k in clean)
    assert not all(torch.equal(clean[k], flipped[k]) for k in clean)
    with pytest.raises(InvalidInput, match="clean_epochs"):
        train(small, tmp_path / "bad", model_config=mc, cfg=TrainConfig(epochs=1, clean_epochs=-1), progress=False)


def test_very_short_runs_train_or_say_why(fashion, tmp_path):
    """A handful of optimizer steps still trains (the warm-up stretches to two steps); fewer than three is refused
    with the fix in the message instead of failing inside the learning-rate schedule."""
    small = Dataset("fashion-mnist", fashion.train.subset(128, seed=3), fashion.test.subset(32, seed=3),
                    fashion.class_names)
    mc = default_model_config(small, bits=16, feature_dim=32)
    model, cfg = train(small, tmp_path / "four", model_config=mc, cfg=TrainConfig(epochs=1, batch_size=32),
                       progress=False)
    assert len(cfg.history) == 1 and np.isfinite(cfg.history[0]["loss"])
    with pytest.raises(InvalidInput, match="smaller batch size"):
        train(small, tmp_path / "two", model_config=mc, cfg=TrainConfig(epochs=1, batch_size=64), progress=False)


def test_compact_term_is_the_within_class_spread_of_the_codes(fashion, tmp_path):
    """`compact` adds the within-class variance of H's activations in the batch: nothing when every image of a class
    has the same activations, a positive amount otherwise, and nothing for multi-label data."""
    from latenthash.export.train import hash_loss

    targets = torch.tensor([0, 0, 1, 1])
    logits = torch.zeros(4, 2)
    same = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.2, 0.8]])
    spread = torch.tensor([[0.9, 0.1], [0.5, 0.1], [0.2, 0.8], [0.2, 0.8]])

    def term(probs: torch.Tensor, multilabel: bool = False) -> float:
        cfg_on, cfg_off = TrainConfig(compact=1.0), TrainConfig(compact=0.0)
        y = torch.nn.functional.one_hot(targets, 2) if multilabel else targets
        return float(hash_loss(logits, probs, y, multilabel=multilabel, cfg=cfg_on)
                     - hash_loss(logits, probs, y, multilabel=multilabel, cfg=cfg_off))

    assert term(same) == pytest.approx(0.0, abs=1e-7)
    # class 0 holds 0.9 and 0.5 on bit 0: variance 0.04 for two of the 8 activations, scaled by 4
    assert term(spread) == pytest.approx(4 * 2 * 0.04 / 8)
    assert term(spread, multilabel=True) == 0.0
    small = Dataset("fashion-mnist", fashion.train.subset(64, seed=4), fashion.test.subset(16, seed=4),
                    fashion.class_names)
    with pytest.raises(InvalidInput, match="compact"):
        train(small, tmp_path / "bad", model_config=default_model_config(small, bits=16, feature_dim=32),
              cfg=TrainConfig(epochs=1, compact=-0.5), progress=False)


def test_copy_head_tells_altered_copies_apart_and_leaves_the_class_path_alone(fashion, tmp_path):
    """The copy term is NT-Xent over (image, altered copy) pairs: near zero when each pair agrees and differs from the
    rest, log(2B - 1) when all descriptors agree. A short real run trains the copy head to rank each altered copy's
    own original first far more often than the class features do, while the class path trains exactly as the same
    run without a copy head."""
    from latenthash.export.copies import altered_copies
    from latenthash.export.train import copy_loss, to_tensor

    pairs = torch.eye(8).repeat(2, 1)  # rows i and 8 + i equal, every other pair orthogonal
    assert float(copy_loss(pairs, 0.1)) < 1e-3
    assert float(copy_loss(torch.ones(16, 4), 0.1)) == pytest.approx(np.log(15), rel=1e-5)
    small = Dataset("fashion-mnist", fashion.train.subset(3000, seed=5), fashion.test.subset(64, seed=5),
                    fashion.class_names)
    rng = np.random.default_rng(0)
    originals = small.train.images[:300]
    copies = altered_copies(originals, rng)
    assert copies.shape == originals.shape and copies.dtype == np.uint8 and not np.array_equal(copies, originals)
    unit = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)  # noqa: E731
    own_first = lambda a, b: float(((unit(a) @ unit(b).T).argmax(1) == np.arange(len(a))).mean())  # noqa: E731

    runs = {}
    for copy_dim in (0, 64):
        mc = default_model_config(small, bits=16, feature_dim=64, copy_dim=copy_dim)
        runs[copy_dim], _ = train(small, tmp_path / f"copy{copy_dim}", model_config=mc,
                                  cfg=TrainConfig(epochs=2, batch_size=64), progress=False)
    model = runs[64]
    assert runs[0].copy_head is None
    p0, f0, _ = predict(runs[0], originals)
    p64, f_orig, _ = predict(model, originals)
    np.testing.assert_allclose(p64, p0, atol=1e-4)  # the class path: as without a copy head
    np.testing.assert_allclose(f_orig, f0, atol=1e-3)
    _, f_copy, _ = predict(model, copies)
    with torch.inference_mode():
        d_orig, d_copy = (model.copy_head(to_tensor(x, model.config)).numpy() for x in (originals, copies))
    assert own_first(d_copy, d_orig) > own_first(f_copy, f_orig) + 0.2
    with pytest.raises(InvalidInput, match="copy"):
        train(small, tmp_path / "bad", model_config=mc, cfg=TrainConfig(epochs=1, copy=-1.0), progress=False)
    from latenthash.export.model import CopyHead

    with pytest.raises(InvalidInput, match="copy-dim 0"):
        CopyHead(1, (6, 6), 64)
