"""``--out`` of import and export: never the source or a folder inside or above it (replacing it
would delete what is read), and a place that cannot be written (read-only, a full disk) is one
line, exit 2, with nothing left behind."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moedsl.hf.files as files  # noqa: E402
from moedsl.cli import main  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)


def _hf(folder: Path) -> Path:
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**TINY)).save_pretrained(folder)
    return folder


def _contents(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys, argv, *needles) -> str:
    capsys.readouterr()  # transformers' own lines from building the checkpoint
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("where", ["same", "inside", "above"])
def test_import_out_that_is_the_source_or_inside_or_above_it_is_refused_and_the_source_kept(tmp_path, capsys,
                                                                                                where):
    src = _hf(tmp_path / "top" / "hf")
    before = _contents(tmp_path / "top")
    out = {"same": src, "inside": src / "imported", "above": tmp_path / "top"}[where]
    _one_line(capsys, ["import", str(src), "--out", str(out), "--overwrite"], f"--out {out}", "source")
    assert (src / "config.json").is_file()
    assert _contents(tmp_path / "top") == before


@pytest.mark.parametrize("where", ["same", "inside", "above"])
def test_export_out_that_is_the_source_or_inside_or_above_it_is_refused_and_the_edited_spec_kept(tmp_path, capsys,
                                                                                                    where):
    imp = tmp_path / "top" / "imp"
    assert main(["import", str(_hf(tmp_path / "hf")), "--out", str(imp)]) == 0
    (imp / "spec.yaml").write_text((imp / "spec.yaml").read_text() + "# my edit\n")
    before = _contents(tmp_path / "top")
    out = {"same": imp, "inside": imp / "exported", "above": tmp_path / "top"}[where]
    _one_line(capsys, ["export", str(imp), "--out", str(out), "--overwrite"], f"--out {out}", "source")
    assert (imp / "spec.yaml").read_text().endswith("# my edit\n")
    assert _contents(tmp_path / "top") == before


def test_export_of_a_spec_with_checkpoint_into_the_folder_holding_the_spec_is_refused(tmp_path, capsys):
    imp = tmp_path / "imp"
    assert main(["import", str(_hf(tmp_path / "hf")), "--out", str(imp)]) == 0
    edited = tmp_path / "mine" / "spec.yaml"
    edited.parent.mkdir()
    edited.write_text((imp / "spec.yaml").read_text())
    _one_line(capsys, ["export", str(edited), "--checkpoint", str(imp), "--out", str(edited.parent), "--overwrite"],
              "holds the source")
    assert edited.is_file()


@pytest.mark.parametrize("command", ["import", "export"])
def test_out_in_a_place_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, capsys, command):
    src = _hf(tmp_path / "hf")
    if command == "export":
        assert main(["import", str(src), "--out", str(tmp_path / "imp")]) == 0
        src = tmp_path / "imp"
    out = Path("/proc") / f"moedsl-out-{tmp_path.name}"  # root writes through chmod 0o555, not into /proc
    _one_line(capsys, [command, str(src), "--out", str(out)], f"--out {out}", "not written")
    assert not out.exists() and not list(Path("/proc").glob(f".{out.name}.tmp-*"))


@pytest.mark.parametrize("command", ["import", "export"])
def test_full_disk_is_one_line_and_leaves_no_partial_folder(tmp_path, capsys, monkeypatch, command):
    src = _hf(tmp_path / "hf")
    if command == "export":
        assert main(["import", str(src), "--out", str(tmp_path / "imp")]) == 0
        src = tmp_path / "imp"

    def full(path, entries, *_):  # a disk that fills after the first bytes of the first shard
        with open(path, "wb") as f:
            f.write(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(files, "_write_file", full)
    out = tmp_path / "new" / "deeper" / "o"
    _one_line(capsys, [command, str(src), "--out", str(out)], f"--out {out}", "no space left on device", "free there")
    assert not (tmp_path / "new").exists()  # the folders it made for --out go too, with the partial shard


def test_overwrite_whose_final_rename_fails_puts_the_old_out_back_whole(tmp_path, capsys, monkeypatch):
    src = _hf(tmp_path / "hf")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rename = files.os.replace

    def failing(a, b):  # the old out moves aside, then the new one cannot take its place
        if Path(b) == out and ".tmp-" in Path(a).name:
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(a))
        return rename(a, b)

    monkeypatch.setattr(files.os, "replace", failing)
    _one_line(capsys, ["import", str(src), "--out", str(out), "--overwrite"], f"--out {out}", "not written")
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "o"]
