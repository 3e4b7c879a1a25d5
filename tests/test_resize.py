"""The C entry point to torch's antialiased bilinear resize (csrc/cpu/resize_u8.cpp,
fasttrain.data.resize) against its twin, torchvision's resize as the torch backend calls it."""
import threading

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from fasttrain.data import resize
from fasttrain.data.transforms import resize_square


def _image(height: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=g)


def _reference(hwc: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return TF.resize(hwc.permute(2, 0, 1).contiguous(), [height, width],
                     antialias=True).permute(1, 2, 0)


def test_the_function_is_built():
    # tools/env.sh builds fasttrain/ops/_C: a library without the function is a stale build.
    assert resize.AVAILABLE, resize.LOAD_ERROR


@pytest.mark.parametrize("size, out", [
    ((280, 300), (224, 224)),  # a typical crop, downscaled (antialiasing filter > 1 pixel)
    ((100, 90), (224, 224)),  # upscaled: plain bilinear
    ((500, 375), (176, 150)),  # non-square output
    ((224, 224), (224, 224)),  # nothing to resize: a copy
    ((7, 3), (32, 5)),  # tiny, mixed up/down
    ((1, 1), (4, 4)),
    ((640, 33), (3, 2)),  # extreme downscale
])
def test_pixels_equal_torchvision_resize(size, out):
    image = _image(*size, seed=size[0])
    assert torch.equal(resize.resize_rgb(image, *out), _reference(image, *out))


def test_a_window_of_a_larger_image_is_resized_in_place():
    big = _image(300, 400, seed=1)
    window = big[17:17 + 250, 33:33 + 290]  # rows 1,200 bytes apart, not packed
    assert not window.is_contiguous()
    expected = _reference(window, 224, 224)
    assert torch.equal(resize.resize_rgb(window, 224, 224), expected)
    # the torch backend's call, which sees a packed crop
    assert torch.equal(resize_square(window.contiguous().permute(2, 0, 1), 224),
                       expected.permute(2, 0, 1))


def test_threads_resize_concurrently():
    """FFCV's threads call the function at once (ctypes drops the GIL): each result is the
    serial one."""
    images = [_image(200 + 7 * i, 260 - 5 * i, seed=i) for i in range(8)]
    expected = [_reference(im, 96, 112) for im in images]
    results: dict[int, list[torch.Tensor]] = {}

    def work(k: int) -> None:
        results[k] = [resize.resize_rgb(im, 96, 112) for im in images * 5]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        assert all(torch.equal(r, expected[i % 8]) for i, r in enumerate(results[k]))


@pytest.mark.parametrize("image, message", [
    (torch.zeros(4, 4, 3, dtype=torch.float32), "uint8"),
    (torch.zeros(4, 4, 4, dtype=torch.uint8), r"\(4, 4, 4\)"),
    (torch.zeros(3, 4, 4, dtype=torch.uint8).permute(1, 2, 0), "strides"),  # planar memory
    (torch.zeros(0, 4, 3, dtype=torch.uint8), r"\(0, 4, 3\)"),
])
def test_bad_images_are_refused(image, message):
    with pytest.raises(ValueError, match=message):
        resize.resize_rgb(image, 8, 8)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="0x8"):
        resize.resize_rgb(_image(4, 4, 0), 0, 8)


def test_the_c_function_refuses_bad_arguments_without_raising():
    fn = resize.numba_resizer()
    image = _image(4, 4, 0)
    out = torch.empty(8, 8, 3, dtype=torch.uint8)
    assert fn(image.data_ptr(), 4, 4, 12, out.data_ptr(), 8, 8) == 0
    assert fn(0, 4, 4, 12, out.data_ptr(), 8, 8) == -1  # null source
    assert fn(image.data_ptr(), 4, 4, 11, out.data_ptr(), 8, 8) == -1  # rows overlap
    assert fn(image.data_ptr(), 4, 4, 12, out.data_ptr(), 0, 8) == -1
