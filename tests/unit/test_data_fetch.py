"""Finding, fetching (without any network) and loading datasets."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import io
import os
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedlearn.data import DATASETS, fetch, load_dataset, locate, status
from fedlearn.data.datasets import NORMALIZATION, clear_cache
from fedlearn.data.fetch import SOURCES, data_home, system_dirs, verify_file
from fedlearn.errors import ConfigError, DatasetCorruptError, DatasetNotFoundError

# ``fedlearn.data.fetch`` the attribute is the function, so get the module from sys.modules.
fetch_mod = importlib.import_module("fedlearn.data.fetch")
REAL_DOWNLOAD = fetch_mod._download  # saved before the autouse fixture replaces it
REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train-images-idx3-ubyte.gz": "train_images",
    "train-labels-idx1-ubyte.gz": "train_labels",
    "t10k-images-idx3-ubyte.gz": "test_images",
    "t10k-labels-idx1-ubyte.gz": "test_labels",
}
CIFAR_MEMBERS = [f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)] + [
    "cifar-10-batches-bin/test_batch.bin"
]


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(">u1").tobytes()


def small_mnist(n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=n_train).astype(np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=n_test).astype(np.uint8),
    }
    arrays["train_images"][0, 0, 0] = 0
    arrays["train_images"][0, 0, 1] = 255
    return arrays


def write_mnist(directory: Path, arrays: dict[str, np.ndarray], *, gz: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for filename, key in IDX_FILES.items():
        data = idx_bytes(arrays[key])
        if gz:
            (directory / filename).write_bytes(gzip.compress(data))
        else:
            (directory / filename.removesuffix(".gz")).write_bytes(data)
    return directory


def write_cifar(path: Path, per_batch: int = 2, seed: int = 0) -> np.ndarray:
    """Write a small official-format archive; returns the first training image."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    first: np.ndarray | None = None
    with tarfile.open(path, "w:gz") as tar:
        for member in CIFAR_MEMBERS:
            images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
            labels = rng.integers(0, 10, size=per_batch, dtype=np.uint8)
            if first is None:
                first = images[0]
            data = b"".join(
                bytes([lab]) + img.tobytes() for lab, img in zip(labels, images, strict=True)
            )
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert first is not None
    return first


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Empty data home and system roots, offline, and a download that must not be called."""
    monkeypatch.setenv("FEDLEARN_DATA", str(tmp_path / "home"))
    monkeypatch.setenv("FEDLEARN_SYSTEM_DATA", str(tmp_path / "system"))
    monkeypatch.setenv("FEDLEARN_OFFLINE", "1")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(fetch_mod, "_download", no_network)
    clear_cache()
    yield
    clear_cache()


@pytest.mark.parametrize("name", ["mnist", "cifar10", "fashion-mnist"])
def test_missing_dataset_explains_how_to_get_it(name: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name)
    message = str(info.value)
    assert name in message
    assert str((tmp_path / "home" / name).resolve()) in message
    assert f"fedlearn datasets fetch {name}" in message
    assert str(tmp_path / "system" / name) in message or name == "cifar10"
    for filename in SOURCES[name].files:
        assert filename in message
    if name == "fashion-mnist":
        assert "apt-get install dataset-fashion-mnist" in message
    with pytest.raises(DatasetNotFoundError):
        load_dataset(name, download=False)


def test_small_mnist_loads_and_normalises(tmp_path: Path) -> None:
    arrays = small_mnist()
    write_mnist(tmp_path / "home" / "mnist", arrays)
    ds = load_dataset("mnist")
    assert (ds.train_size, ds.test_size) == (12, 5)
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_train.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and ds.input_shape == (1, 28, 28)
    assert ds.num_classes == 10
    assert ds.x_train[0, 0, 0, 0] == -1.0 and ds.x_train[0, 0, 0, 1] == 1.0
    expected = (arrays["test_images"].astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(ds.x_test[:, 0], expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ds.y_train, arrays["train_labels"])
    np.testing.assert_array_equal(ds.y_test, arrays["test_labels"])
    assert ds.source == str((tmp_path / "home" / "mnist").resolve())


def test_cache_and_read_only(tmp_path: Path) -> None:
    write_mnist(tmp_path / "home" / "mnist", small_mnist())
    first = load_dataset("mnist")
    assert load_dataset("mnist") is first
    for array in (first.x_train, first.y_train, first.x_test, first.y_test):
        assert not array.flags.writeable
        with pytest.raises(ValueError):
            array[0] = 0


def test_ungzipped_idx_accepted(tmp_path: Path) -> None:
    write_mnist(tmp_path / "system" / "mnist", small_mnist(), gz=False)
    assert locate("mnist") == tmp_path / "system" / "mnist"
    assert load_dataset("mnist").train_size == 12


def test_mnist_bad_shapes_are_corrupt(tmp_path: Path) -> None:
    arrays = small_mnist()
    arrays["train_labels"] = arrays["train_labels"][:-1]
    write_mnist(tmp_path / "home" / "mnist", arrays)
    with pytest.raises(DatasetCorruptError, match=r"train-labels-idx1-ubyte\.gz"):
        load_dataset("mnist")
    clear_cache()
    arrays = small_mnist()
    arrays["test_labels"][0] = 10
    write_mnist(tmp_path / "home" / "mnist", arrays)
    with pytest.raises(DatasetCorruptError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_dataset("mnist")
    arrays = small_mnist()
    arrays["test_images"] = arrays["test_images"][:, :27, :]
    write_mnist(tmp_path / "home" / "mnist", arrays)
    with pytest.raises(DatasetCorruptError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_dataset("mnist")


def test_small_cifar_loads_and_normalises(tmp_path: Path) -> None:
    first = write_cifar(tmp_path / "home" / "cifar10" / "cifar-10-binary.tar.gz")
    ds = load_dataset("cifar10")
    assert (ds.train_size, ds.test_size) == (10, 2)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.input_shape == (3, 32, 32)
    norm = NORMALIZATION["cifar10"]
    mean = np.array(norm.mean, dtype=np.float32)[:, None, None]
    std = np.array(norm.std, dtype=np.float32)[:, None, None]
    np.testing.assert_allclose(ds.x_train[0], (first / 255.0 - mean) / std, atol=1e-5)


def test_locate_prefers_data_home(tmp_path: Path) -> None:
    write_mnist(tmp_path / "system" / "mnist", small_mnist(seed=1))
    assert locate("mnist") == tmp_path / "system" / "mnist"
    write_mnist(tmp_path / "home" / "mnist", small_mnist(seed=2))
    assert locate("mnist") == tmp_path / "home" / "mnist"
    assert fetch("mnist") == tmp_path / "home" / "mnist"
    assert status("mnist").found_at == tmp_path / "home" / "mnist"


def test_incomplete_folder_is_not_located(tmp_path: Path) -> None:
    directory = write_mnist(tmp_path / "home" / "mnist", small_mnist())
    (directory / "t10k-labels-idx1-ubyte.gz").unlink()
    assert locate("mnist") is None


def test_system_data_path_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    roots = [tmp_path / "a", tmp_path / "b"]
    monkeypatch.setenv("FEDLEARN_SYSTEM_DATA", os.pathsep.join(map(str, roots)))
    assert system_dirs("mnist") == [roots[0] / "mnist", roots[1] / "mnist"]
    write_mnist(roots[1] / "mnist", small_mnist())
    assert locate("mnist") == roots[1] / "mnist"


def test_data_home_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDLEARN_DATA")
    assert data_home() == Path.home() / ".cache" / "fedlearn"


def test_fetch_downloads_each_file_trying_mirrors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDLEARN_OFFLINE")
    arrays = small_mnist()
    calls: list[tuple[str, str, str]] = []

    def fake_download(
        checksum: str, base: str, filename: str, target: Path, progress: bool
    ) -> None:
        calls.append((checksum, base, filename))
        if "ossci" in base:
            raise OSError("first mirror is down")
        target.mkdir(parents=True, exist_ok=True)
        (target / filename).write_bytes(gzip.compress(idx_bytes(arrays[IDX_FILES[filename]])))

    monkeypatch.setattr(fetch_mod, "_download", fake_download)
    assert fetch("mnist") == tmp_path / "home" / "mnist"
    assert len(calls) == 8
    assert calls[0] == (
        SOURCES["mnist"].files["train-images-idx3-ubyte.gz"],
        SOURCES["mnist"].mirrors[0],
        "train-images-idx3-ubyte.gz",
    )
    assert load_dataset("mnist").train_size == 12


def test_fetch_all_mirrors_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDLEARN_OFFLINE")

    def failing(*args: object, **kwargs: object) -> None:
        raise ValueError("MD5 hash of downloaded file does not match")

    monkeypatch.setattr(fetch_mod, "_download", failing)
    with pytest.raises(DatasetNotFoundError, match="fedlearn datasets fetch cifar10") as info:
        fetch("cifar10")
    assert "cifar-10-binary.tar.gz" in str(info.value)


def test_unknown_dataset_is_config_error() -> None:
    for call in (load_dataset, locate, status, fetch, system_dirs):
        with pytest.raises(ConfigError) as info:
            call("imagenet")
        for name in DATASETS:
            assert name in str(info.value)


def test_digits_offline() -> None:
    ds = load_dataset("digits")
    assert (ds.train_size, ds.test_size) == (1437, 360)
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.input_shape == (1, 8, 8)
    assert ds.x_train.min() == -1.0 and ds.x_train.max() == 1.0
    assert set(np.unique(ds.y_test)) == set(range(10))
    assert load_dataset("digits") is ds
    st = status("digits")
    assert (st.train_size, st.test_size, st.num_classes) == (1437, 360, 10)


def test_status_does_not_need_data() -> None:
    st = status("cifar10")
    assert st.found_at is None
    assert (st.train_size, st.test_size, st.input_shape) == (50000, 10000, (3, 32, 32))
    assert status("fashion-mnist").input_shape == (1, 28, 28)


def test_verify_file_accepts_official_and_recompressed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"payload"
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(data))
    assert not verify_file("mnist", path)
    md5 = hashlib.md5(data).hexdigest()
    source = SOURCES["mnist"]
    patched = dict(source.contents, **{"train-labels-idx1-ubyte": f"md5:{md5}"})
    monkeypatch.setitem(SOURCES, "mnist", dataclasses.replace(source, contents=patched))
    assert verify_file("mnist", path)
    plain = tmp_path / "train-labels-idx1-ubyte"
    plain.write_bytes(data)
    assert verify_file("mnist", plain)


def test_extracted_cifar_folder_loads(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-binary.tar.gz"
    write_cifar(archive)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "home" / "cifar10", filter="data")
    assert locate("cifar10") == tmp_path / "home" / "cifar10"
    assert load_dataset("cifar10").train_size == 10


def test_download_uses_pooch_with_checksum_and_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pooch

    seen: dict[str, object] = {}

    def fake_retrieve(url: str, **kwargs: object) -> str:
        seen.update(kwargs, url=url)
        return str(tmp_path / "x")

    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    REAL_DOWNLOAD("md5:abc", "https://example.invalid/", "f.gz", tmp_path, False)
    assert seen["url"] == "https://example.invalid/f.gz"
    assert seen["known_hash"] == "md5:abc" and seen["fname"] == "f.gz"
    assert seen["path"] == tmp_path
    downloader = seen["downloader"]
    assert isinstance(downloader, pooch.HTTPDownloader)
    assert downloader.kwargs["timeout"] == 20


# --- the real Fashion-MNIST, when a system copy is installed -------------------------------


@pytest.fixture
def real_fashion(monkeypatch: pytest.MonkeyPatch) -> Path:
    if not all((REAL_FASHION / f).is_file() for f in SOURCES["fashion-mnist"].files):
        pytest.skip(f"no system copy of Fashion-MNIST in {REAL_FASHION}")
    monkeypatch.setenv("FEDLEARN_SYSTEM_DATA", str(REAL_FASHION.parent))
    return REAL_FASHION


def test_real_fashion_mnist_loads(real_fashion: Path) -> None:
    ds = load_dataset("fashion-mnist", download=False)
    assert (ds.train_size, ds.test_size, ds.num_classes) == (60000, 10000, 10)
    assert ds.x_train.shape == (60000, 1, 28, 28)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.x_train.min() == -1.0 and ds.x_train.max() == 1.0


def test_real_fashion_mnist_checksums(real_fashion: Path) -> None:
    source = SOURCES["fashion-mnist"]
    for filename in source.files:
        path = real_fashion / filename
        assert verify_file("fashion-mnist", path), filename
        payload = hashlib.md5(gzip.decompress(path.read_bytes())).hexdigest()
        assert source.contents[filename.removesuffix(".gz")] == f"md5:{payload}"
