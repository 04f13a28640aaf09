"""Cache location: SELORA_CACHE wins; in a checkout the default stays inside the repository."""

from pathlib import Path

from selora import paths


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SELORA_CACHE", str(tmp_path / "c"))
    p = paths.cache_dir("data", "phantom")
    assert p == tmp_path / "c" / "data" / "phantom" and p.is_dir()


def test_cache_dir_defaults_inside_checkout(monkeypatch):
    monkeypatch.delenv("SELORA_CACHE", raising=False)
    root = paths.repo_root()
    assert root is not None and (root / "_config.yml").is_file()
    assert paths.cache_dir().resolve() == (root / ".cache").resolve()


def test_assets_dir_is_inside_the_package():
    assert paths.ASSETS_DIR.parent == Path(paths.__file__).resolve().parent
