"""User errors: one line on stderr naming the file or value, exit 2, the traceback only with --debug."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eve_ds.cli.bench_data import main as bench_data
from eve_ds.cli.convert import main as convert
from eve_ds.cli.evaluate import main as evaluate
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


# -- every listed user error, as a user meets it: a fresh process, exit 2, one line, no traceback ----------

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = "model: {flavor: eve_tiny}\ntrain: {global_batch_size: 8, micro_batch_size: 4, init_from: none}\n"


def broken_yaml(tmp: Path) -> tuple[list[str], str]:
    (tmp / "broken.yaml").write_text("model:\n  flavor: [eve_tiny\n")
    return ["pretrain", "--config", str(tmp / "broken.yaml")], str(tmp / "broken.yaml")


def corpus_config(tmp: Path, shards: Path) -> Path:
    (tmp / "run.yaml").write_text(TINY_RUN + f"data: {{train: [{{name: web, shards: {shards}}}]}}\n")
    return tmp / "run.yaml"


def missing_shards(tmp: Path) -> tuple[list[str], str]:
    cfg = corpus_config(tmp, tmp / "nowhere")
    return [
        "pretrain",
        "--config",
        str(cfg),
        "--run-dir",
        str(tmp / "run"),
    ], f"no shard exists ({tmp}/nowhere)"


def empty_corpus(tmp: Path) -> tuple[list[str], str]:
    ann, root = tmp / "ann.json", tmp / "img"
    root.mkdir()
    ann.write_text(json.dumps([{"image": "gone.jpg", "caption": "a photo"}]))
    assert make_shards(shards_argv(ann, root, tmp / "shards")) == 2  # made, and said to be empty
    cfg = corpus_config(tmp, tmp / "shards")
    return ["pretrain", "--config", str(cfg), "--run-dir", str(tmp / "run")], "the corpus is empty"


def not_a_checkpoint(tmp: Path) -> tuple[list[str], str]:
    (tmp / "notes").mkdir()
    return ["evaluate", "--checkpoint", str(tmp / "notes")], f"{tmp}/notes is not a DeepSpeed checkpoint"


def bad_convert_source(tmp: Path) -> tuple[list[str], str]:
    return [
        "convert",
        "export",
        str(tmp / "nope"),
        str(tmp / "out"),
    ], f"{tmp}/nope: no such file or directory"


def foreign_run_dir(tmp: Path) -> tuple[list[str], str]:
    (tmp / "pre").mkdir()
    (tmp / "pre" / "config.yaml").write_text(TINY_RUN)  # a pre-training run's record
    argv = ["finetune", "--run-dir", str(tmp / "pre"), "train.init_from=none"]
    return argv, f"--run-dir {tmp}/pre holds a msm run of eve_tiny"


def vqa_root_without_images(tmp: Path) -> tuple[list[str], str]:
    root = tmp / "vqa"
    root.mkdir()
    question = {"image_id": 1, "question": "what?", "question_id": 10}
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": [question]}))
    answers = [{"answer": "no", "answer_confidence": "yes", "answer_id": 1}]
    annotation = {"question_id": 10, "image_id": 1, "answers": answers, "answer_type": "yes/no"}
    annotation |= {"question_type": "is", "multiple_choice_answer": "no"}
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [annotation]}))
    argv = ["finetune", "--run-dir", str(tmp / "run"), "train.init_from=none", "task.synthetic=false"]
    return [*argv, f"task.data_root={root}"], f"image folder not found ({root}/val2014)"


PROGS = {m: f"eve-{m}" for m in ("pretrain", "finetune", "evaluate", "convert")}


@pytest.mark.parametrize(
    "case",
    [
        broken_yaml,
        missing_shards,
        empty_corpus,
        not_a_checkpoint,
        bad_convert_source,
        foreign_run_dir,
        vqa_root_without_images,
    ],
)
def test_each_user_error_is_one_line_and_exit_2(tmp_path, case):
    (module, *argv), needle = case(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-m", f"eve_ds.cli.{module}", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{PROGS[module]}: error: ") and needle in last, result.stderr[-3000:]
    # Refused before anything was written; a task's files are read once the run's log is open (empty).
    written = set(tmp_path.rglob("*")) - set(before)
    assert written <= {tmp_path / "run", tmp_path / "run" / "train.log"}, written
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_evaluate_and_convert_say_the_same_of_what_is_no_checkpoint(tmp_path, capsys):
    for path in (tmp_path / "missing", tmp_path):
        assert convert(["export", str(path), str(tmp_path / "out")]) == 2
        from_convert = one_error_line(capsys, "eve-convert").removeprefix("eve-convert: error: ")
        assert evaluate(["--checkpoint", str(path)]) == 2
        assert one_error_line(capsys, "eve-evaluate") == f"eve-evaluate: error: {from_convert}"
