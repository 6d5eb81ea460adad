"""Checkpoints that go wrong: a truncated one, a changed spec, a full disk."""
from __future__ import annotations

import contextlib
import copy
import errno
import json
from pathlib import Path

import pytest
import torch
import yaml

import moedsl
from moedsl.cli import main
from moedsl.errors import MoedslError
from moedsl.runtime import checkpoint as ckpt
from moedsl.runtime.train import RunOptions, run

TINY = {
    "moedsl": 1,
    "name": "tiny",
    "model": {"vocab_size": 32, "d_model": 16, "max_seq_len": 16},
    "layers": [
        {"embedding": {}},
        {"repeat": 2, "block": [
            {"attention": {"heads": 2}},
            {"moe": {"experts": {"count": 4, "hidden": 16},
                     "gate": {"type": "switch", "capacity_factor": 1.25, "jitter": 0.01},
                     "losses": {"balance": 0.01}}},
        ]},
        {"norm": {}},
        {"head": {}},
    ],
    "train": {"batch_size": 4, "seq_len": 8, "steps": 4, "lr": 3.0e-3, "warmup": 1, "eval_every": 100},
}


def tiny(change=None) -> dict:
    data = copy.deepcopy(TINY)
    if change:
        change(data)
    return data


def moe(data: dict) -> dict:
    return data["layers"][1]["block"][1]["moe"]


def write_spec(tmp_path: Path, data: dict, name="tiny.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def train(tmp_path: Path, data: dict, *extra, name="tiny.yaml") -> int:
    return main(["run", write_spec(tmp_path, data, name), "--out", str(tmp_path / "run"), "--no-progress", *extra])


def losses(out: Path) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def truncate(path: Path, keep: float = 0.4, shard: str = "__0_0.distcp") -> None:
    shard = path / shard
    with open(shard, "r+b") as f:
        f.truncate(int(shard.stat().st_size * keep))


# -- 10: a truncated checkpoint ------------------------------------------------------------

@pytest.mark.slow
def test_resume_skips_a_truncated_checkpoint_and_says_so(tmp_path, capsys):
    assert train(tmp_path, tiny(), "--checkpoint-every", "2") == 0
    first = losses(tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    truncate(checkpoints / "step-00000004")
    capsys.readouterr()
    assert train(tmp_path, tiny(), "--checkpoint-every", "2", "--resume") == 0
    out = capsys.readouterr().out
    assert "checkpoint step-00000004 is broken: its shard __0_0.distcp is truncated" in out
    assert "resuming from step-00000002 instead" in out and f"resumed from {checkpoints / 'step-00000002'}" in out
    assert losses(tmp_path / "run") == first  # steps 3 and 4 again, bit for bit
    assert ckpt.problem(checkpoints / "step-00000004") is None  # saved again, whole


@pytest.mark.slow
def test_resume_from_a_named_truncated_checkpoint_is_one_clear_error(tmp_path, capsys):
    assert train(tmp_path, tiny(), "--checkpoint-every", "2") == 0
    broken = tmp_path / "run" / "checkpoints" / "step-00000002"
    truncate(broken)
    capsys.readouterr()
    assert train(tmp_path, tiny(), "--resume", str(broken)) == 2  # a user's mistake, and no fallback from a named one
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--resume {broken}: its shard __0_0.distcp is truncated" in err


@pytest.mark.slow
def test_resume_with_no_whole_checkpoint_names_each_one_tried(tmp_path, capsys):
    assert train(tmp_path, tiny(), "--checkpoint-every", "3") == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    truncate(checkpoints / "step-00000004")
    (checkpoints / "step-00000003" / ".metadata").write_bytes(b"\x80\x04")
    capsys.readouterr()
    assert train(tmp_path, tiny(), "--resume") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "no checkpoint under" in err and "step-00000004: its shard __0_0.distcp is truncated" in err
    assert "step-00000003: its DCP .metadata is unreadable" in err


@pytest.mark.slow
def test_a_checkpoint_that_fails_to_load_leaves_the_model_as_it_was(tmp_path):
    s = moedsl.load_spec(tiny())
    run(s, RunOptions.from_spec(s, steps=2, out=tmp_path, progress=False))
    path = tmp_path / "checkpoints" / "step-00000002"
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())  # the same size, the last half overwritten: found only by reading
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
    shard.write_bytes(bytes(data))
    assert ckpt.problem(path) is None
    model = moedsl.build_model(s)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ckpt.BrokenCheckpoint, match="cannot read it back"):
        ckpt.load(path, model, None, s)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- 13: what a resume may change ----------------------------------------------------------

@pytest.mark.slow
def test_resume_allows_training_only_changes_and_names_them(tmp_path, capsys):
    assert train(tmp_path, tiny(), "--steps", "3") == 0

    def change(d):
        moe(d)["gate"]["capacity_factor"] = 2.0
        moe(d)["losses"]["balance"] = 0.05
        moe(d)["experts"]["dropout"] = 0.1

    capsys.readouterr()
    assert train(tmp_path, tiny(change), "--steps", "4", "--resume", name="changed.yaml") == 0
    out = capsys.readouterr().out
    assert "resuming with training-only changes since step-00000003:" in out
    for note in ("layers[1].block[1].moe.gate.capacity_factor 1.25 -> 2.0",
                 "layers[1].block[1].moe.losses.balance 0.01 -> 0.05",
                 "layers[1].block[1].moe.experts.dropout 0.0 -> 0.1", "steps 3 -> 4"):
        assert out.count(note) == 1, note  # once, though the block repeats
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]


SAVED = moedsl.load_spec(tiny())
META = {"spec": "tiny", "fingerprint": ckpt.fingerprint(SAVED), "architecture": ckpt.architecture(SAVED),
        "spec_data": SAVED.data, "train": {"steps": 4, "lr": 3.0e-3}}


@pytest.mark.parametrize("change, named", [
    (lambda d: moe(d)["gate"].update(eval_capacity_factor=2.0, min_capacity=2, routing_groups=2),
     "gate.eval_capacity_factor None -> 2.0"),
    (lambda d: moe(d)["gate"].update(drop_policy="dropless") or moe(d)["gate"].pop("capacity_factor"),
     "gate.drop_policy 'drop' -> 'dropless'"),
    (lambda d: moe(d)["gate"].update(jitter=0.0), "gate.jitter 0.01 -> 0.0"),
    (lambda d: moe(d)["losses"].update(z_loss=1e-3), "losses.z_loss 0.0 -> 0.001"),
    (lambda d: moe(d)["experts"].update(init_scale=0.1), "experts.init_scale 1.0 -> 0.1"),
    (lambda d: d["model"].update(dropout=0.1, dtype="bfloat16"), "model.dtype 'float32' -> 'bfloat16'"),
])
def test_training_only_changes_are_allowed_and_named(change, named):
    notes = ckpt.compare(META, moedsl.load_spec(tiny(change)), "step-00000004")
    assert len(notes) == 1 and named in notes[0]


@pytest.mark.parametrize("change, named", [
    (lambda d: moe(d)["experts"].update(hidden=32), "layers[1].block[1].moe.experts.hidden: 16 in the checkpoint, 32"),
    (lambda d: moe(d)["experts"].update(activation="gelu"), "moe.experts.activation: 'relu' in the checkpoint"),
    (lambda d: moe(d)["gate"].update(type="topk", k=2), "moe.gate.k: 1 in the checkpoint, 2 in the spec"),
    (lambda d: moe(d)["gate"].update(bias_balancing={"rate": 1e-3}),
     "moe.gate.bias_balancing_rate: None in the checkpoint"),
    (lambda d: d["layers"][1].update(repeat=3), "layers: '7 layers' in the checkpoint, '9 layers' in the spec"),
    (lambda d: d["model"].update(d_model=32), "model.d_model: 16 in the checkpoint, 32 in the spec"),
])
def test_changes_of_the_weights_shapes_or_meaning_are_refused(change, named):
    with pytest.raises(MoedslError, match="architecture differs") as e:
        ckpt.compare(META, moedsl.load_spec(tiny(change)), "step-00000004")
    assert named in str(e.value)


def test_expert_choice_capacity_factor_is_its_k_and_is_refused():
    def ec(cf):
        return lambda d: moe(d).update(gate={"type": "expert_choice", "capacity_factor": cf}, losses={})

    saved = moedsl.load_spec(tiny(ec(1.0)))
    meta = {"spec": "tiny", "fingerprint": ckpt.fingerprint(saved), "architecture": ckpt.architecture(saved),
            "spec_data": saved.data}
    with pytest.raises(MoedslError, match=r"moe.gate.capacity_factor: 1.0 in the checkpoint, 2.0 in the spec"):
        ckpt.compare(meta, moedsl.load_spec(tiny(ec(2.0))), "step-00000004")


def test_a_checkpoint_whose_spec_this_version_cannot_read_is_compared_as_written():
    meta = dict(META, spec_data={"moedsl": 99})  # an older or newer spec format: compared as written
    notes = ckpt.compare(meta, moedsl.load_spec(tiny(lambda d: moe(d)["gate"].update(capacity_factor=2.0))), "p")
    assert "layers[1].block[1].moe.gate.capacity_factor 1.25 -> 2.0" in notes[0]
    with pytest.raises(MoedslError, match=r"layers\[1\].block\[1\].moe.experts.count: 4 in the checkpoint, 8"):
        ckpt.compare(meta, moedsl.load_spec(tiny(lambda d: moe(d)["experts"].update(count=8))), "p")


@pytest.mark.slow
def test_a_checkpoint_without_recorded_run_options_still_resumes(tmp_path, capsys):
    assert train(tmp_path, tiny(), "--steps", "3") == 0
    meta_path = tmp_path / "run" / "checkpoints" / "step-00000003" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["train"]  # as written before run options were recorded
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    assert train(tmp_path, tiny(), "--steps", "4", "--resume") == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "training-only changes" not in out


# -- 15: a full disk during a save ---------------------------------------------------------

class FullDisk:
    """DCP's file layer over a disk with ``free`` bytes left for paths containing ``where``."""

    def __init__(self, setattr, where: str, free: int):
        from torch.distributed.checkpoint.filesystem import FileSystem

        self.where, self.free = where, free
        real = FileSystem.create_stream
        disk = self

        @contextlib.contextmanager
        def create_stream(fs, path, mode):
            with real(fs, path, mode) as stream:
                if disk.where in str(path) and "w" in mode:
                    stream.write = disk.writer(stream.write)
                yield stream

        setattr(FileSystem, "create_stream", create_stream)

    def writer(self, write):
        def limited(data):
            n = memoryview(data).nbytes
            if n > self.free:
                write(bytes(memoryview(data).cast("B")[:self.free]))  # what fits is written first
                self.free = 0
                raise OSError(errno.ENOSPC, "No space left on device")
            self.free -= n
            return write(data)
        return limited


@pytest.mark.slow
def test_a_full_disk_during_a_save_says_so_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    FullDisk(monkeypatch.setattr, "step-00000004.tmp", free=20_000)
    assert train(tmp_path, tiny(), "--checkpoint-every", "2") == 1
    err = capsys.readouterr().err
    checkpoints = tmp_path / "run" / "checkpoints"
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "checkpoint step-00000004 not saved: no space left on device (it needs about" in err
    assert f"the last good checkpoint is {checkpoints / 'step-00000002'}" in err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000002"]  # no .tmp left
    assert (checkpoints / "latest").read_text().strip() == "step-00000002"
    monkeypatch.undo()  # space again: the resumed run goes on from the last good one
    assert train(tmp_path, tiny(), "--checkpoint-every", "2", "--resume") == 0
    assert ckpt.latest(checkpoints).name == "step-00000004"
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.slow
def test_a_failed_meta_json_write_removes_the_partial_save(tmp_path, monkeypatch):
    s = moedsl.load_spec(tiny())
    run(s, RunOptions.from_spec(s, steps=2, out=tmp_path, progress=False))
    checkpoints = tmp_path / "checkpoints"
    write_text = Path.write_text

    def full(path, text, *a, **kw):
        if path.name == "meta.json":
            raise OSError(errno.EDQUOT, "Disk quota exceeded", str(path))
        return write_text(path, text, *a, **kw)

    monkeypatch.setattr(Path, "write_text", full)
    model = moedsl.build_model(s)
    with pytest.raises(MoedslError) as e:
        ckpt.save(checkpoints, 4, model, None, s, {}, 0, 1)
    monkeypatch.undo()
    assert str(e.value).startswith("checkpoint step-00000004 not saved: disk quota exceeded")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000002"]


def test_a_save_failing_for_another_reason_names_it(tmp_path, monkeypatch):
    s = moedsl.load_spec(tiny())
    from torch.distributed.checkpoint.filesystem import FileSystem

    @contextlib.contextmanager
    def broken(fs, path, mode):
        raise OSError(errno.EIO, "Input/output error", str(path))
        yield

    monkeypatch.setattr(FileSystem, "create_stream", broken)
    with pytest.raises(MoedslError) as e:
        ckpt.save(tmp_path, 2, moedsl.build_model(s), None, s, {}, 0, 1)
    assert str(e.value) == "checkpoint step-00000002 not saved: input/output error (errno EIO); " \
                           "there is no earlier checkpoint"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_partial_save_left_by_a_killed_run_is_removed_on_resume_and_said(tmp_path, capsys):
    assert train(tmp_path, tiny(), "--steps", "2") == 0
    stale = tmp_path / "run" / "checkpoints" / "step-00000004.tmp"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(bytes(5000))
    capsys.readouterr()
    assert train(tmp_path, tiny(), "--steps", "3", "--resume") == 0
    assert "removed step-00000004.tmp, a save that did not finish (4.88 KiB)" in capsys.readouterr().out
    assert not stale.exists()


def _two_ranks(rank: int, world: int, directory: Path):
    """On each of 2 ranks: two saves, a resume past a truncated shard of rank 1, then a save
    that fills rank 1's disk."""
    import torch.distributed as dist

    s = moedsl.load_spec(tiny())
    model = moedsl.build_model(s, rank=rank, world_size=world)
    for step in (2, 4):
        ckpt.save(directory, step, model, None, s, {}, rank, world)
    if rank == 0:
        truncate(directory / "step-00000004", shard="__1_0.distcp")
    dist.barrier()
    meta = ckpt.resume(directory, True, model, None, s, {}, rank, world)
    if rank == 1:
        FullDisk(setattr, "step-00000006.tmp", free=5_000)
    try:
        ckpt.save(directory, 6, model, None, s, {}, rank, world)
        error = None
    except MoedslError as e:
        error = str(e)
    dist.barrier()
    return meta["path"].name, meta["notes"], error, sorted(p.name for p in directory.iterdir())


@pytest.mark.slow
def test_two_ranks_resume_from_the_same_checkpoint_and_fail_a_save_together(tmp_path):
    from moedsl.runtime.spawn import spawn

    r0, r1 = spawn(_two_ranks, 2, tmp_path)
    assert r0 == r1  # the same checkpoint, the same notes, the same error, on both ranks
    path, notes, error, left = r0
    assert path == "step-00000002"
    assert notes == ["checkpoint step-00000004 is broken: its shard __1_0.distcp is truncated "
                     f"({int(0.4 * (tmp_path / 'step-00000002' / '__1_0.distcp').stat().st_size):,} of "
                     f"{(tmp_path / 'step-00000002' / '__1_0.distcp').stat().st_size:,} bytes); "
                     "resuming from step-00000002 instead"]
    assert error.startswith("checkpoint step-00000006 not saved: no space left on device")
    assert error.endswith(f"the last good checkpoint is {tmp_path / 'step-00000002'}")
    assert left == ["latest", "step-00000002", "step-00000004"]


def test_a_save_removes_a_partial_save_a_killed_run_left_and_says_so(tmp_path, capsys):
    s = moedsl.load_spec(tiny())
    stale = tmp_path / "step-00000009.tmp"
    stale.mkdir()
    (stale / ".metadata").write_bytes(bytes(300))
    ckpt.save(tmp_path, 2, moedsl.build_model(s), None, s, {}, 0, 1)
    assert "moedsl: removed step-00000009.tmp, a save that did not finish (300 B)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002"]


# -- issue 22, 5: a stale `latest` pointer ---------------------------------------------------

MIXTRAL_TINY = {  # a Mixtral-like spec (top-2 dropless SwiGLU experts, RMSNorm, rotary): `moedsl export` takes it
    "moedsl": 1,
    "name": "mixtral-tiny",
    "model": {"vocab_size": 32, "d_model": 16, "max_seq_len": 16, "norm": "rmsnorm"},
    "layers": [
        {"embedding": {}},
        {"repeat": 2, "block": [
            {"attention": {"heads": 2, "kv_heads": 1, "positions": "rotary"}},
            {"moe": {"experts": {"count": 4, "hidden": 16, "activation": "swiglu"},
                     "gate": {"type": "topk", "k": 2, "drop_policy": "dropless"}, "losses": {"balance": 0.01}}},
        ]},
        {"norm": {}},
        {"head": {}},
    ],
    "train": {"batch_size": 4, "seq_len": 8, "steps": 2, "lr": 3.0e-2, "warmup": 1, "eval_every": 100,
              "eval_batches": 1},
}


def _exported(tmp_path: Path, name: str, *source) -> dict:
    from safetensors.torch import load_file

    assert main(["export", *source, "--out", str(tmp_path / name)]) == 0
    return {k: v for f in sorted((tmp_path / name).glob("*.safetensors")) for k, v in load_file(f).items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_newer_whole_checkpoint_wins_over_a_stale_latest_pointer_everywhere(tmp_path, capsys):
    """A run killed between the rename of step-00000002 and the update of ``latest``: the pointer
    still names step-00000001. Resume, load_model, export, generate, eval and inspect all take
    the newer whole one."""
    from moedsl.runtime.generate_cli import model_for_rank

    spec = write_spec(tmp_path, MIXTRAL_TINY, "mixtral-tiny.yaml")
    run_dir = tmp_path / "run"
    assert train(tmp_path, MIXTRAL_TINY, "--checkpoint-every", "1", name="mixtral-tiny.yaml") == 0
    checkpoints = run_dir / "checkpoints"
    older, newer = checkpoints / "step-00000001", checkpoints / "step-00000002"
    (checkpoints / "latest").write_text(older.name + "\n")  # the update the kill prevented
    want = moedsl.load_model(spec, checkpoint=newer).state_dict()
    assert not _same(want, moedsl.load_model(spec, checkpoint=older).state_dict())  # the two are told apart

    assert _same(moedsl.load_model(run_dir).state_dict(), want)
    assert _same(moedsl.load_model(checkpoints).state_dict(), want)
    assert _same(model_for_rank(str(run_dir), None, 0, 1)[0].state_dict(), want)  # moedsl generate's model
    assert _same(_exported(tmp_path, "exp-run", str(run_dir)), _exported(tmp_path, "exp-new", spec, "--checkpoint",
                                                                           str(newer)))
    assert moedsl.evaluate(str(run_dir))["checkpoint"] == str(newer)
    assert moedsl.inspect(str(run_dir), tokens=64)["weights"] == str(newer)
    capsys.readouterr()
    assert train(tmp_path, MIXTRAL_TINY, "--steps", "3", "--resume", name="mixtral-tiny.yaml") == 0
    assert f"resumed from {newer} at step 2" in capsys.readouterr().out



def test_a_step_saved_after_a_resume_from_an_earlier_checkpoint_is_newer_than_a_higher_step(tmp_path):
    """Checkpoints 2 and 4, then a run resumed from 2 saves 3: 3 is the newest (4 belongs to the
    abandoned run), as `latest` says; the step number alone would take 4."""
    s = moedsl.load_spec(tiny())
    for step, seed in ((2, 1), (4, 2), (3, 3)):
        ckpt.save(tmp_path, step, moedsl.build_model(s, seed=seed), None, s, {}, 0, 1)
    assert ckpt.newest_whole(tmp_path).name == "step-00000003"
    assert _same(moedsl.load_model(tmp_path).state_dict(), moedsl.build_model(s, seed=3).state_dict())

# -- issue 22, 16: the format version --------------------------------------------------------

def _saved(tmp_path: Path, format_version="as saved") -> tuple:
    """A tiny model saved at step 2 (``format_version``: what its meta.json then says; None: no
    version field, as written before versions existed): (spec, model, checkpoint folder)."""
    s = moedsl.load_spec(tiny())
    model = moedsl.build_model(s, seed=3)
    path = ckpt.save(tmp_path, 2, model, None, s, {}, 0, 1)
    if format_version != "as saved":
        meta = json.loads((path / "meta.json").read_text())
        meta.pop("format")
        if format_version is not None:
            meta["format"] = format_version
        (path / "meta.json").write_text(json.dumps(meta))
    return s, model, path


def test_a_checkpoint_records_the_format_version_this_moedsl_writes_and_loads_it(tmp_path):
    s, model, path = _saved(tmp_path)
    assert json.loads((path / "meta.json").read_text())["format"] == ckpt.FORMAT
    back = moedsl.build_model(s, seed=4)
    ckpt.load(path, back, None, s)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_checkpoint_written_before_format_versions_is_still_read(tmp_path):
    s, model, path = _saved(tmp_path, format_version=None)
    back = moedsl.load_model(tmp_path)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_checkpoint_of_an_unknown_format_version_is_refused_naming_it_in_one_line(tmp_path, capsys):
    s, model, path = _saved(tmp_path, format_version=ckpt.FORMAT + 1)
    with pytest.raises(MoedslError) as e:
        ckpt.load(path, moedsl.build_model(s), None, s)
    message = str(e.value)
    assert "\n" not in message
    assert f"checkpoint {path} has format version {ckpt.FORMAT + 1}; this moedsl reads format {ckpt.FORMAT} and " \
           "checkpoints written before format versions" in message
    with pytest.raises(MoedslError, match=f"format version {ckpt.FORMAT + 1}"):  # not skipped as broken
        ckpt.resume(tmp_path, True, moedsl.build_model(s), None, s)
    capsys.readouterr()
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"has format version {ckpt.FORMAT + 1}" in err


def _send_tables(rank: int, world: int, datas: list) -> list:
    from moedsl.runtime.ckpt_format import state_dict

    out = []
    for data in datas:
        model = moedsl.build_model(moedsl.load_spec(data), seed=0, rank=rank, world_size=world)
        out.append(sorted(k for k in state_dict(model, None, {}) if "send_" in k))
    return out


@pytest.mark.slow
def test_no_checkpoint_holds_an_all_to_alls_send_tables_chunked_trips_included():
    """The send tables are the placement's (a rank's slots on another mesh, dispatch or expert
    parallel size differ), never the model's state: on 2 expert-parallel ranks no checkpoint key
    holds one, for capacity and dropless layers, whole or in the overlap pass's chunks (whose
    trips the graph reads through plain modules fx makes at their paths)."""
    from moedsl.runtime.spawn import spawn

    def variant(gate: dict, chunks: int) -> dict:
        def change(d):
            moe(d)["gate"] = gate
            moe(d)["overlap"] = {"chunks": chunks}
        return tiny(change)

    datas = [variant(g, c) for g in ({"type": "switch", "capacity_factor": 1.25}, {"type": "topk", "k": 2})
             for c in (1, 2)]
    for keys in spawn(_send_tables, 2, datas):
        assert keys == [[]] * len(datas), keys
