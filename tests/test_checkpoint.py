"""Checkpoints carry a SHA-256; damaged, empty and unwritable checkpoints give errors that say what to do."""

import errno
import io

import pytest
import torch

from torchslim.errors import TrainingError
from torchslim.train import TrainConfig, fit, load_checkpoint, save_checkpoint
from torchslim.train import checkpoint as ckpt_module

STATE = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 2, "history": [{"loss": 0.5}]}


def test_round_trip_with_a_checksum_header(tmp_path):
    path = tmp_path / "a.pt"
    save_checkpoint(path, STATE)
    assert path.read_bytes().startswith(b"TORCHSLIM-CHECKPOINT 1\nsha256 ")
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["w"], STATE["model"]["w"]) and state["epoch"] == 2


def test_a_flipped_bit_names_the_file_and_says_to_delete_it(tmp_path):
    path = tmp_path / "stage.pt"
    save_checkpoint(path, STATE)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(TrainingError, match=rf"checkpoint {path} is corrupt: its SHA-256 does not match.*"
                                            r"Delete it to restart the stage"):
        load_checkpoint(path)


def test_a_flipped_bit_stops_a_resume_instead_of_loading_wrong_weights(tiny_mlp, blobs, tmp_path):
    path = tmp_path / "stage.pt"
    fit(tiny_mlp, blobs, TrainConfig(epochs=1, batch_size=64), checkpoint_path=path, progress=False)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(TrainingError, match="corrupt"):
        fit(tiny_mlp, blobs, TrainConfig(epochs=2, batch_size=64), checkpoint_path=path, progress=False)


def test_empty_truncated_and_garbage_files_name_the_problem(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(TrainingError, match=rf"checkpoint {empty} is empty \(0 bytes\).*Delete it"):
        load_checkpoint(empty)
    cut = tmp_path / "cut.pt"
    save_checkpoint(cut, STATE)
    cut.write_bytes(cut.read_bytes()[:-10])
    with pytest.raises(TrainingError, match=r"is truncated.*Delete it"):
        load_checkpoint(cut)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(TrainingError, match=r"cannot read checkpoint .*garbage.pt: it is not a torch checkpoint "
                                            r"or is damaged \(.+\)\. Delete it"):
        load_checkpoint(garbage)


def test_a_checkpoint_written_before_checksums_still_loads(tmp_path):
    path = tmp_path / "old.pt"
    torch.save(STATE, path)
    assert load_checkpoint(path)["epoch"] == 2


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed: No space left on device"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_a_full_disk_is_a_training_error_saying_what_to_free(error, tmp_path, monkeypatch):
    path = tmp_path / "stage.pt"
    save_checkpoint(path, STATE)
    before = path.read_bytes()

    def full(fh, chunks):
        fh.write(chunks[0][:10])
        raise error

    monkeypatch.setattr(ckpt_module, "_write", full)
    with pytest.raises(TrainingError, match=rf"no space left on device while writing checkpoint {path}.*free space"):
        save_checkpoint(path, {**STATE, "epoch": 3})
    assert path.read_bytes() == before  # the last good checkpoint survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage.pt"]  # no temporary file left


def test_other_write_errors_pass_through(tmp_path, monkeypatch):
    def broken(fh, chunks):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ckpt_module, "_write", broken)
    with pytest.raises(OSError, match="Input/output"):
        save_checkpoint(tmp_path / "x.pt", STATE)
