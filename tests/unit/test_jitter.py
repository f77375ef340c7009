"""The teacher's jitter (pipeline.jitter): spatial axes only, every channel by the same shift with its
own fill value shifted in, for any number of channels; [B, H, W] shifted too; feature rows refused."""
import numpy as np
import pytest
import torch

from pipeline.jitter import jitter
from tests.images import channel_distinct, spatial_shift


@pytest.mark.parametrize("dtype, fill", [
    (torch.float32, [-1.5, -2.5, -3.5, -4.5]),  # normalised rows: each channel's own black
    (torch.uint8, [0]),                          # raw pixels (the transfer-set copies): black is 0
], ids=["per-channel-fill", "one-fill"])
def test_no_channel_ever_mixes(dtype, fill):
    x = channel_distinct(64, 4, 9, 7)  # H != W: a swapped axis shows too
    out = jitter(torch.from_numpy(x).to(dtype), 2, torch.Generator().manual_seed(0),
                 torch.tensor(fill, dtype=dtype) if len(fill) > 1 else fill[0]).numpy()
    assert out.shape == x.shape
    per_channel = np.broadcast_to(np.asarray(fill, out.dtype), (4,))
    shifts = [spatial_shift(x[i].astype(out.dtype), out[i], per_channel, 2) for i in range(len(x))]
    assert None not in shifts  # every image: all its channels moved together, each with its own fill
    assert len(set(shifts)) > 10
    for c in range(4):  # and no value of another channel ever lands in channel c
        v = out[:, c]
        assert ((v == per_channel[c]) | ((v >= 10 * c + 1) & (v <= 10 * c + 9))).all()


def test_images_without_a_channel_axis_are_shifted(tmp_path):
    x = channel_distinct(32, 1, 8, 8)[:, 0]  # [B, H, W]
    out = jitter(torch.from_numpy(x), 2, torch.Generator().manual_seed(1), 0).numpy()
    shifts = [spatial_shift(x[i][None], out[i][None], [0], 2) for i in range(len(x))]
    assert None not in shifts and sum(s != (0, 0) for s in shifts) > 20  # moved, not silently left alone


def test_one_fill_for_every_channel_is_the_per_channel_path():
    x = torch.from_numpy(channel_distinct(16, 3, 6, 6)).float()
    a = jitter(x, 2, torch.Generator().manual_seed(2), -1.0)
    b = jitter(x, 2, torch.Generator().manual_seed(2), torch.tensor([-1.0, -1.0, -1.0]))
    assert torch.equal(a, b)  # the same draws, the same pixels


def test_rows_that_are_not_images_are_refused():
    rows = torch.zeros(4, 12)
    with pytest.raises(ValueError, match="not a batch of shape \\[4, 12\\]"):
        jitter(rows, 1, torch.Generator(), 0.0)
    assert jitter(rows, 0, torch.Generator(), 0.0) is rows  # shift 0: nothing to do, any shape
    with pytest.raises(ValueError, match="fill has 2 values for images of 3 channels"):
        jitter(torch.zeros(2, 3, 4, 4), 1, torch.Generator(), torch.tensor([0.0, 1.0]))
