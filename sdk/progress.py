"""Progress bars for long work: shown on a terminal only, so a log (CI, systemd, a redirected run) never fills with
thousands of redraws."""

from __future__ import annotations


def progress(iterable=None, *, show: bool = True, **options):
    """A tqdm bar over `iterable` (or a manual one with total=...); `show=False` hides it everywhere."""
    from tqdm import tqdm

    return tqdm(iterable, disable=None if show else True, **options)
