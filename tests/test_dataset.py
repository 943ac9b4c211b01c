"""Dataset config validation, bucket selection and target/control alignment."""

import numpy as np
import pytest
from PIL import Image

from musubi_tuner.dataset.buckets import bucket_resolutions, resize_crop, select_bucket
from musubi_tuner.dataset.config import load_dataset_config
from musubi_tuner.dataset.items import collect_items
from musubi_tuner.dataset.synthetic import write_shapes_dataset
from musubi_tuner.errors import UserError
from musubi_tuner.models.registry import VERSIONS


def write_toml(tmp_path, text):
    p = tmp_path / "dataset.toml"
    p.write_text(text)
    return p


def test_good_config_with_general_defaults(tmp_path):
    img = write_shapes_dataset(tmp_path / "imgs", n=2)
    (tmp_path / "meta.jsonl").write_text(f'{{"image_path": "{img}/img000.png", "caption": "x"}}\n')
    cfgs = load_dataset_config(write_toml(tmp_path, f"""
[general]
resolution = [960, 544]
caption_extension = ".txt"
batch_size = 2
enable_bucket = true
bucket_no_upscale = false

[[datasets]]
image_directory = "{img}"
cache_directory = "{tmp_path / 'cache'}"
num_repeats = 3

[[datasets]]
image_jsonl_file = "{tmp_path / 'meta.jsonl'}"
cache_directory = "{tmp_path / 'cache2'}"
resolution = 512
"""))
    a, b = cfgs
    assert a.resolution == (960, 544) and a.batch_size == 2 and a.num_repeats == 3 and a.enable_bucket
    assert b.resolution == (512, 512) and b.batch_size == 2 and b.image_jsonl_file
    items = collect_items(cfgs, VERSIONS["original"])
    assert len(items) == 3 and items[0].caption.startswith("a ")


@pytest.mark.parametrize("body,message", [
    ('resolutoin = 512\nimage_directory = "{img}"', "unknown key 'resolutoin' (did you mean 'resolution'?)"),
    ('resolution = "big"\nimage_directory = "{img}"', "resolution must be an int or [width, height]"),
    ('batch_size = 0\nimage_directory = "{img}"', "batch_size must be a positive integer"),
    ('enable_bucket = "yes"\nimage_directory = "{img}"', "enable_bucket must be bool"),
    ('image_directory = "{img}/nope"', "image_directory does not exist"),
    ('resolution = [500, 512]\nimage_directory = "{img}"', "multiples of 16"),
    ('image_jsonl_file = "{img}/img000.txt"', "cache_directory is required"),
    ('cache_directory = "{img}"', "exactly one of image_directory or image_jsonl_file"),
])
def test_bad_configs(tmp_path, body, message):
    img = write_shapes_dataset(tmp_path / "imgs", n=1)
    p = write_toml(tmp_path, "[[datasets]]\n" + body.format(img=img) + "\n")
    with pytest.raises(UserError) as e:
        load_dataset_config(p)
    assert message in str(e.value) and str(p) in str(e.value) and "#1" in str(e.value)


def test_unreadable_toml_and_missing_caption(tmp_path):
    p = write_toml(tmp_path, "[[datasets]\nimage_directory = 1")
    with pytest.raises(UserError, match="invalid TOML"):
        load_dataset_config(p)
    img = write_shapes_dataset(tmp_path / "imgs", n=2)
    (img / "img001.txt").unlink()
    cfg = load_dataset_config(write_toml(tmp_path, f'[[datasets]]\nimage_directory = "{img}"\n'))
    with pytest.raises(UserError, match=r"img001.png has no caption file img001.txt"):
        collect_items(cfg, VERSIONS["original"])


def test_control_and_layer_count_validation(tmp_path):
    img = write_shapes_dataset(tmp_path / "imgs", n=3, controls=2)
    ctrl = tmp_path / "imgs_control"
    toml = f'[[datasets]]\nimage_directory = "{img}"\ncontrol_directory = "{ctrl}"\nbatch_size = 2\n'
    cfg = load_dataset_config(write_toml(tmp_path, toml))
    items = collect_items(cfg, VERSIONS["edit-2509"])
    assert [len(i.controls) for i in items] == [2, 2, 2]
    assert items[0].controls[0].name == "img000_0.png" and items[0].controls[1].name == "img000_1.png"
    with pytest.raises(UserError, match="takes exactly one"):
        collect_items(cfg, VERSIONS["edit"])
    (ctrl / "img002_1.png").unlink()
    with pytest.raises(UserError, match="img002.png has 1 control image but .*img000.png has 2"):
        collect_items(cfg, VERSIONS["edit-2511"])

    lay = write_shapes_dataset(tmp_path / "layers", n=2, layers=3)
    cfg = load_dataset_config(write_toml(tmp_path, f'[[datasets]]\nimage_directory = "{lay}"\nmultiple_target = true\n'))
    items = collect_items(cfg, VERSIONS["layered"])
    assert [len(i.targets) for i in items] == [4, 4]
    (lay / "img001_3.png").unlink()
    with pytest.raises(UserError, match="img001.png has 2 layers but .*img000.png has 3"):
        collect_items(cfg, VERSIONS["layered"])
    cfg = load_dataset_config(write_toml(tmp_path, f'[[datasets]]\nimage_directory = "{lay}"\n'))
    with pytest.raises(UserError, match="multiple_target = true"):
        collect_items(cfg, VERSIONS["layered"])


def test_bucket_table():
    table = {
        (1024, 1024): (1024, 1024), (1920, 1080): (1360, 768), (1080, 1920): (768, 1360),
        (800, 600): (1184, 880), (600, 800): (880, 1184), (4000, 1000): (2048, 512),
    }
    for size, bucket in table.items():
        assert select_bucket(size, (1024, 1024)) == bucket, size
    assert select_bucket((800, 600), (1024, 1024), no_upscale=True) == (800, 592)
    assert select_bucket((1920, 1080), (1024, 1024), enable_bucket=False) == (1024, 1024)
    for w, h in bucket_resolutions((1024, 1024)):
        assert w % 16 == 0 and h % 16 == 0 and w * h <= 1024 * 1024


def test_target_and_control_crops_are_pixel_aligned():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)
    target, control = Image.fromarray(arr), Image.fromarray(arr.copy())
    bucket = select_bucket(target.size, (256, 256))
    a, b = resize_crop(target, bucket), resize_crop(control, bucket)
    assert a.size == bucket and np.array_equal(np.asarray(a), np.asarray(b))
    # a marker pixel lands at the same place in both
    arr2 = arr.copy()
    arr2[150, 250] = [255, 0, 255]
    c = np.asarray(resize_crop(Image.fromarray(arr2), bucket)).astype(int)
    d = np.asarray(a).astype(int)
    ys, xs = np.nonzero(np.abs(c - d).sum(-1))
    assert abs(ys.mean() - bucket[1] / 2) < 3 and abs(xs.mean() - bucket[0] / 2) < 3


def test_example_configs_parse(tmp_path):
    """The shipped example TOMLs are valid configs once their paths exist."""
    from pathlib import Path

    root = Path(__file__).parents[1] / "examples"
    for name in ("dataset_image.toml", "dataset_edit.toml", "dataset_layered.toml"):
        text = (root / name).read_text()
        for p in ("/path/to/images", "/path/to/targets", "/path/to/controls", "/path/to/layered"):
            text = text.replace(p, str(tmp_path))
        (tmp_path / "edit.jsonl").write_text("")
        text = text.replace("/path/to/edit.jsonl", str(tmp_path / "edit.jsonl"))
        cfgs = load_dataset_config(write_toml(tmp_path, text))
        assert cfgs and all(c.resolution[0] % 16 == 0 for c in cfgs)


def _musubi_bucket(size, resolution, no_upscale=False, step=16):
    """musubi-tuner's BucketSelector (dataset/bucket.py), written out from its code: widths from
    floor16(sqrt(A) // 2) to sqrt(A) in steps of 16 with h = floor16(A // w), plus transposes, sorted; the first
    bucket of least |w/h - aspect|; no_upscale keeps a small image's size rounded down to 16."""
    import math

    area = resolution[0] * resolution[1]
    if no_upscale and size[0] * size[1] <= area:
        return size[0] - size[0] % step, size[1] - size[1] % step
    side = int(math.sqrt(area))
    buckets = set()
    for w in range(side // 2 - (side // 2) % step, side + step, step):
        h = (area // w) - (area // w) % step
        buckets |= {(w, h), (h, w)}
    buckets = sorted(buckets)
    errors = [abs(w / h - size[0] / size[1]) for w, h in buckets]
    return buckets[errors.index(min(errors))]


def test_buckets_equal_musubi_tuners_over_a_grid():
    sizes = [(w, h) for w in range(64, 2400, 97) for h in range(64, 2400, 89)] + [(777, 333), (500, 400), (4000, 1000)]
    for resolution in ((1024, 1024), (960, 544), (256, 256), (1328, 1328), (512, 768)):
        for size in sizes:
            for no_upscale in (False, True):
                want = _musubi_bucket(size, resolution, no_upscale)
                assert select_bucket(size, resolution, no_upscale=no_upscale) == want, (size, resolution, no_upscale)
    # the cases the migration report found (musubi's answer on the right)
    assert select_bucket((500, 400), (960, 544)) == (816, 640)
    assert select_bucket((777, 333), (256, 256)) == (400, 160)


def test_images_musubi_groups_together_share_a_bucket_and_a_batch_shape():
    """100x100 and 184x140 at 64x64 are one bucket in musubi-tuner (so its loader stacks their caches): here too."""
    assert select_bucket((100, 100), (64, 64)) == select_bucket((184, 140), (64, 64)) == _musubi_bucket((100, 100),
                                                                                                       (64, 64))


def test_resize_is_musubis_cover_round_half_up_and_area_downscale():
    """Scale to cover (sides int(x * s + 0.5)), Lanczos up / OpenCV INTER_AREA down, centre crop."""
    import cv2

    rng = np.random.default_rng(1)
    arr = rng.integers(0, 255, (333, 777, 3), dtype=np.uint8)
    out = np.asarray(resize_crop(Image.fromarray(arr), (400, 160)))
    scale = max(400 / 777, 160 / 333)
    nw, nh = int(777 * scale + 0.5), int(333 * scale + 0.5)
    ref = cv2.resize(arr, (nw, nh), interpolation=cv2.INTER_AREA)
    left, top = (nw - 400) // 2, (nh - 160) // 2
    assert np.array_equal(out, ref[top:top + 160, left:left + 400])
    small = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    up = np.asarray(resize_crop(Image.fromarray(small), (64, 64)))
    s = max(64 / 50, 64 / 40)
    ref = np.asarray(Image.fromarray(small).resize((int(50 * s + 0.5), int(40 * s + 0.5)), Image.LANCZOS))
    assert np.array_equal(up, ref[:, (ref.shape[1] - 64) // 2:(ref.shape[1] - 64) // 2 + 64])
