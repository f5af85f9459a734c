"""User errors: one line on stderr naming the file or value, exit 2, the traceback only with --debug."""

from __future__ import annotations

import json

import pytest

from eve_ds.cli.bench_data import main as bench_data
from eve_ds.cli.make_shards import main as make_shards
from eve_ds.cli.make_synthetic import main as make_synthetic
from eve_ds.cli.pretrain import main as pretrain
from eve_ds.data import CorpusConfig, DataConfig, build_train_loader
from eve_ds.data.manifest import DataError
from eve_ds.utils.errors import UserError, one_line, run_cli


def one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"{prog}: error: ")
    return err[0]


def test_run_cli_turns_user_errors_into_one_line(capsys):
    def main(argv):
        if argv == ["bug"]:
            raise RuntimeError("a real bug")
        raise UserError("no such thing\n(x.json); pass --thing")

    assert run_cli("eve-x", main, []) == 2
    assert one_error_line(capsys, "eve-x") == "eve-x: error: no such thing (x.json); pass --thing"
    with pytest.raises(UserError):  # --debug: the traceback, and the command's parser never sees the flag
        run_cli("eve-x", main, ["--debug"])
    with pytest.raises(RuntimeError):  # a bug is not a user error
        run_cli("eve-x", main, ["bug"])
    assert run_cli("eve-x", lambda argv: 3, []) == 3 and run_cli("eve-x", lambda argv: None, []) == 0
    assert run_cli("eve-x", lambda argv: int("x"), [], user_errors=(ValueError,)) == 2
    assert one_line("p", KeyError()) == "p: error: KeyError"


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    return root


def shards_argv(ann, root, out) -> list[str]:
    return ["--format", "albef-json", "--input", str(ann), "--image-root", str(root), "--output", str(out)]


def test_make_shards_missing_annotation_file(tmp_path, image_root, capsys):
    missing = tmp_path / "nope.json"
    assert make_shards(shards_argv(missing, image_root, tmp_path / "out")) == 2
    line = one_error_line(capsys, "eve-make-shards")
    assert line == f"eve-make-shards: error: annotation file not found ({missing}); check --input"
    assert not (tmp_path / "out").exists()  # nothing written
    with pytest.raises(DataError):
        make_shards([*shards_argv(missing, image_root, tmp_path / "out"), "--debug"])


def test_make_shards_annotation_file_not_json(tmp_path, image_root, capsys):
    ann = tmp_path / "ann.json"
    ann.write_text("image,caption\na.jpg,a photo\n")
    assert make_shards(shards_argv(ann, image_root, tmp_path / "out")) == 2
    line = one_error_line(capsys, "eve-make-shards")
    assert f"the annotation file is not JSON ({ann}: Expecting value: line 1 column 1" in line
    assert "--format csv" in line
    ann.write_text(json.dumps([{"img": "a.jpg", "caption": "x"}]))  # JSON, but not an annotation list
    assert make_shards(shards_argv(ann, image_root, tmp_path / "out")) == 2
    assert "annotation item 0 has no image and caption" in one_error_line(capsys, "eve-make-shards")


def test_make_shards_missing_image_root(tmp_path, capsys):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": "a.jpg", "caption": "a photo"}]))
    root = tmp_path / "images"
    assert make_shards(shards_argv(ann, root, tmp_path / "out")) == 2
    line = one_error_line(capsys, "eve-make-shards")
    assert line.startswith(f"eve-make-shards: error: image root not found ({root}); pass --image-root DIR")


def test_make_synthetic_and_bench_data(tmp_path, capsys):
    taken = tmp_path / "a_file"
    taken.write_text("")
    argv = ["--output", str(taken), "--num-train", "2", "--num-val", "1"]
    assert make_synthetic(argv) == 2
    line = one_error_line(capsys, "eve-make-synthetic")
    assert f"a file is in the way of the output directory ({taken}/train); give a directory" in line
    spec = str(tmp_path / "gone/shard-{000000..000001}.tar")
    assert bench_data(["--shards", spec, "--workers", "0"]) == 2
    assert f"corpus bench: no shard exists ({spec})" in one_error_line(capsys, "eve-bench-data")


def test_missing_shard_path_at_training_time_is_one_line(tmp_path, capsys):
    spec = str(tmp_path / "shards")
    cfg = DataConfig(train=[CorpusConfig("web", spec)], num_workers=0)

    def train(argv):
        build_train_loader(cfg, image_size=32, max_text_len=8, batch_size=2, rank=0, world_size=1, seed=0)

    assert run_cli("eve-pretrain", train, []) == 2
    line = one_error_line(capsys, "eve-pretrain")
    assert f"corpus web: no shard exists ({spec}); check the corpus' shards: path" in line


def test_dry_run_flags_an_empty_corpus(tmp_path, image_root, capsys):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": f"missing{i}.jpg", "caption": "a photo"} for i in range(3)]))
    out = tmp_path / "shards"
    assert make_shards(shards_argv(ann, image_root, out)) == 2  # made, and said to be empty
    capsys.readouterr()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: {flavor: eve_tiny}\n"
        f"data: {{train: [{{name: web, shards: {out}}}]}}\n"
        "train: {global_batch_size: 8, micro_batch_size: 4, init_from: none}\n"
    )
    assert pretrain(["--config", str(cfg), "--dry-run"]) == 2
    problems = [line for line in capsys.readouterr().out.splitlines() if line.startswith("PROBLEM")]
    assert problems == [
        f"PROBLEM: data.train[web]: the corpus is empty: its 1 shard(s) hold 0 samples ({out}/manifest.json); "
        "see skipped.jsonl next to the manifest for why, then remake them"
    ]
    # What the training run itself raises, for the trainer's one-line report.
    with pytest.raises(DataError, match=rf"corpus web is empty: .*\({out}/manifest.json\)"):
        build_train_loader(
            DataConfig(train=[CorpusConfig("web", str(out))], num_workers=0),
            **dict(image_size=32, max_text_len=8, batch_size=2, rank=0, world_size=1, seed=0),
        )
