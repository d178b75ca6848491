"""mass-ext in-process on a tiny MLP: a good build and info, and every bad input gives one
line `mass-ext: error: ...` with status 2 (no traceback) and loses no file."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mass_ext import cli

D_IN, D_HIDDEN, D_OUT = 6, 8, 4
BASE = "tests.test_cli:make_base"


def make_base():
    """The factory --base names: the same weights in every call."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(D_IN, D_HIDDEN), nn.Tanh(), nn.Linear(D_HIDDEN, D_OUT))


def make_dict():
    return {"not": "a module"}


NOT_CALLABLE = 3


@pytest.fixture
def tasks(tmp_path):
    """Two fine-tuned checkpoints; returns their paths and the --task arguments."""
    paths, args = [], []
    for t in range(2):
        expert = make_base()
        with torch.no_grad():
            for p in expert.parameters():
                p += 0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(t))
        path = tmp_path / f"t{t}.safetensors"
        save_file({k: v.contiguous() for k, v in expert.state_dict().items()}, path)
        paths.append(path)
        args += ["--task", f"t{t}={path}"]
    return paths, args


def run_cli(capsys, *argv):
    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(capsys, argv, *expected):
    """Status 2, and stderr's last line is argparse's error line holding every `expected`."""
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(("mass-ext: error: ", "mass-ext build: error: ")), err
    for text in expected:
        assert text in line, line
    return line


def build_args(task_args, output, *extra):
    return ["build", "--base", BASE, *task_args, "--router-layer", "0", "-o", output, *extra]


def test_build_then_info(tasks, tmp_path, capsys):
    _, task_args = tasks
    bundle = tmp_path / "b.safetensors"
    code, out, err = run_cli(capsys, *build_args(task_args, bundle, "--top-k", "2"))
    assert code == 0, err
    assert "tasks       2: t0, t1" in out and "model       Sequential\n" in out
    code, out, err = run_cli(capsys, "info", bundle)
    assert code == 0, err
    assert "routed      2 Linear layers" in out and "top_k=2" in out
    # Rebuilding over an existing bundle is allowed.
    assert run_cli(capsys, *build_args(task_args, bundle))[0] == 0
    code, _, err = run_cli(capsys, *build_args(task_args, bundle, "--first-pass", "tsvm",
                                               "--first-pass-scale", "0.5"))
    assert code == 0, err
    from safetensors import safe_open
    with safe_open(bundle, framework="pt") as f:
        router = json.loads(f.metadata()["mass_ext"])["router"]
    assert router["first_pass"] == "tsvm" and router["first_pass_scale"] == 0.5


def test_duplicate_task_name_is_an_error(tasks, tmp_path, capsys):
    (a, b), _ = tasks
    assert_error(capsys, build_args(["--task", f"t0={a}", "--task", f"t0={b}"],
                                    tmp_path / "o.safetensors"), "--task", "'t0'", "twice")


@pytest.mark.parametrize("task", ["t0", "=x.safetensors", "t0="])
def test_task_without_name_or_checkpoint_is_an_error(task, tmp_path, capsys):
    assert_error(capsys, build_args(["--task", task], tmp_path / "o.safetensors"),
                 "--task must be NAME=CHECKPOINT", repr(task))


@pytest.mark.parametrize("via", ["path", "symlink", "relative"])
def test_output_onto_a_checkpoint_is_refused_before_any_work(via, tasks, tmp_path, capsys,
                                                             monkeypatch):
    (a, _), task_args = tasks
    before = a.read_bytes()
    monkeypatch.setattr(cli, "load_base", lambda spec: pytest.fail("built before checking -o"))
    monkeypatch.chdir(tmp_path)
    output = {"path": a, "symlink": tmp_path / "link.safetensors", "relative": a.name}[via]
    if via == "symlink":
        output.symlink_to(a)
    assert_error(capsys, build_args(task_args, output), "-o", "is an input of this build")
    assert a.read_bytes() == before


def test_output_onto_a_checkpoint_folders_weights_is_refused(tasks, tmp_path, capsys):
    (a, b), _ = tasks
    folder = tmp_path / "task_folder"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(a.read_bytes())
    assert_error(capsys, build_args(["--task", f"t0={folder}", "--task", f"t1={b}"], weights),
                 "is an input of this build")
    assert weights.read_bytes() == a.read_bytes()


def test_sharded_task_folders_build_and_their_shards_are_inputs(tasks, tmp_path, capsys):
    """A task given as a sharded checkpoint (folder or index) builds the bundle its
    single file builds; -o onto one of its shards is refused."""
    from safetensors.torch import load_file

    from .test_model import _save_sharded

    (a, b), task_args = tasks
    folder = _save_sharded(load_file(a), tmp_path / "t0_sharded")
    index = folder / "model.safetensors.index.json"
    single, sharded = tmp_path / "single.safetensors", tmp_path / "sharded.safetensors"
    for spec, out in ((a, single), (folder, sharded), (index, sharded)):
        code, _, err = run_cli(capsys, *build_args(["--task", f"t0={spec}", "--task", f"t1={b}"],
                                                   out))
        assert code == 0, err
    assert load_file(single).keys() == load_file(sharded).keys()
    assert all(torch.equal(load_file(single)[k], load_file(sharded)[k]) for k in load_file(single))
    shard = folder / "model-00002-of-00002.safetensors"
    before = shard.read_bytes()
    assert_error(capsys, build_args(["--task", f"t0={folder}", "--task", f"t1={b}"], shard),
                 "is an input of this build")
    assert shard.read_bytes() == before


def test_output_onto_the_base_folders_weights_is_refused(tasks, tmp_path, capsys, monkeypatch):
    _, task_args = tasks
    folder = tmp_path / "base_model"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(b"base weights")
    monkeypatch.setattr(cli, "load_base", lambda spec: pytest.fail("built before checking -o"))
    args = build_args(task_args, weights)
    args[args.index(BASE)] = str(folder)
    assert_error(capsys, args, "is an input of this build", "model.safetensors")
    assert weights.read_bytes() == b"base weights"


def test_output_onto_a_file_that_is_no_bundle_is_refused(tasks, tmp_path, capsys):
    _, task_args = tasks
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    assert_error(capsys, build_args(task_args, other), "is not a mass_ext bundle",
                 "refusing to overwrite")
    assert other.read_text() == "keep me"


@pytest.mark.parametrize("case", ["missing folder", "directory", "trailing slash"])
def test_bad_output_path_fails_before_any_work(case, tasks, tmp_path, capsys, monkeypatch):
    _, task_args = tasks
    monkeypatch.setattr(cli, "load_base", lambda spec: pytest.fail("built before checking -o"))
    output, expected = {
        "missing folder": (tmp_path / "nope" / "b.safetensors", "does not exist"),
        "directory": (tmp_path, "must name a bundle file"),
        "trailing slash": (f"{tmp_path / 'new'}{os.sep}", "must name a bundle file"),
    }[case]
    assert_error(capsys, build_args(task_args, output), "-o", expected)


def test_unwritable_output_folder_fails_before_any_work(tasks, tmp_path, capsys, monkeypatch):
    _, task_args = tasks

    def refuse(dir):
        raise PermissionError(13, "Permission denied", dir)

    # Root writes anywhere, so a read-only folder proves nothing there: refuse the probe.
    monkeypatch.setattr(cli, "tempfile", SimpleNamespace(TemporaryFile=refuse))
    monkeypatch.setattr(cli, "load_base", lambda spec: pytest.fail("built before checking -o"))
    assert_error(capsys, build_args(task_args, tmp_path / "b.safetensors"),
                 "-o", "cannot write to the folder", "Permission denied")


@pytest.mark.parametrize("flag, value", [
    ("--rank", "0"), ("--rank", "-3"), ("--rank", "two"), ("--top-k", "0"),
    ("--temperature", "0"), ("--temperature", "-1"), ("--temperature", "nan"),
    ("--temperature", "inf"), ("--threshold", "nan"), ("--threshold", "-inf"),
])
def test_bad_numbers_are_refused_by_argparse(flag, value, tasks, tmp_path, capsys):
    _, task_args = tasks
    assert_error(capsys, build_args(task_args, tmp_path / "o.safetensors", f"{flag}={value}"),
                 f"argument {flag}", repr(value))


def test_top_k_above_the_number_of_tasks_is_refused(tasks, tmp_path, capsys):
    _, task_args = tasks
    assert_error(capsys, build_args(task_args, tmp_path / "o.safetensors", "--top-k", "3"),
                 "--top-k must be at most the number of tasks (2), got 3")


def test_bad_build_inputs(tasks, tmp_path, capsys):
    """One case per kind of bad input; each names the argument and what was wrong."""
    (a, b), task_args = tasks
    out = tmp_path / "o.safetensors"
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    empty_folder = tmp_path / "empty_folder"
    empty_folder.mkdir()
    wrong = tmp_path / "wrong.safetensors"
    save_file({"weight": torch.zeros(2)}, wrong)

    def with_base(base, task_args=task_args, *extra):
        args = build_args(task_args, out, *extra)
        args[args.index(BASE)] = base
        return args

    cases = [
        (with_base(BASE, task_args, "--router-layer", "9"), ["router_layer", "'9'"]),
        (with_base(BASE, task_args, "--router-layer", "0"), ["--router-layer", "['0']"]),
        (with_base("tests.test_cli:make_dict"), ["--base", "torch.nn.Module", "dict"]),
        (with_base("tests.no_such_module:make"), ["--base", "cannot import", "no_such_module"]),
        (with_base("tests.test_cli:no_such"), ["--base", "no function 'no_such'"]),
        (with_base("tests.test_cli:NOT_CALLABLE"), ["--base", "'NOT_CALLABLE'", "int"]),
        (with_base("no_folder_no_colon"), ["--base must be", "'no_folder_no_colon'"]),
        (with_base(BASE, ["--task", f"t0={corrupt}", "--task", f"t1={b}"]),
         ["--task t0", "corrupt.safetensors", "not a readable .safetensors state dict"]),
        (with_base(BASE, ["--task", f"t0={empty_folder}", "--task", f"t1={b}"]),
         ["--task t0", "holds no model.safetensors"]),
        (with_base(BASE, ["--task", f"t0={tmp_path / 'gone.safetensors'}"]),
         ["--task t0", "does not exist"]),
        (with_base(BASE, ["--task", f"t0={wrong}", "--task", f"t1={b}"]),
         ["--task t0 does not match the base model"]),
    ]
    for argv, expected in cases:
        assert_error(capsys, argv, *expected)
    assert not out.exists()


@pytest.mark.parametrize("metadata, expected", [
    (None, "not a mass_ext bundle"),
    ("{not json", "corrupt mass_ext metadata (not JSON"),
    (json.dumps({"format_version": 1}), "'task_names' must be a JSON array, got NoneType"),
    (json.dumps([1, 2]), "corrupt mass_ext metadata (not a JSON object)"),
    (json.dumps({"format_version": 1, "task_names": ["a"], "routed_layers": {"0": 3},
                 "router": {}}), "bad mass_ext metadata"),
])
def test_info_on_a_bad_bundle(metadata, expected, tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata=None if metadata is None
              else {"mass_ext": metadata})
    assert_error(capsys, ["info", path], str(path), expected)


@pytest.mark.parametrize("case", ["missing", "folder", "garbage"])
def test_info_on_a_path_that_is_no_safetensors_file(case, tmp_path, capsys):
    path = {"missing": tmp_path / "gone.safetensors", "folder": tmp_path,
            "garbage": tmp_path / "garbage.safetensors"}[case]
    if case == "garbage":
        path.write_bytes(b"\x00" * 3)
    assert_error(capsys, ["info", path], str(path))


def test_a_clamped_rank_warns_in_one_line_of_the_command(tasks, tmp_path, capsys):
    """Warnings from the build (a rank above a layer's clamped) print as mass-ext's own
    line, not as the library source line that raised them."""
    _, task_args = tasks
    code, _, err = run_cli(capsys, *build_args(task_args, tmp_path / "b.safetensors",
                                               "--rank", "100000"))
    assert code == 0, err
    warning = [line for line in err.splitlines() if "rank" in line]
    assert warning and warning[0].startswith("mass-ext: warning: "), err
    assert "model.py" not in err and "MASS.from_finetuned(" not in err


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m["routed_layers"]["0"].update(rank="a"), "layer '0' has rank 'a', not a positive int"),
    (lambda m: m.update(task_names=m["task_names"][:1]), "the metadata says 1 task(s) of rank"),
    (lambda m: m["routed_layers"]["0"].update(rank=1), "task(s) of rank 1"),
])
def test_info_refuses_metadata_that_disagrees_with_the_tensors(edit, expected, tasks, tmp_path,
                                                              capsys):
    """A bundle whose metadata was edited (a rank that is no int, fewer task names, another
    rank) is refused by info, as MASS.load refuses it, not described."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    _, task_args = tasks
    bundle = tmp_path / "b.safetensors"
    assert run_cli(capsys, *build_args(task_args, bundle))[0] == 0
    with safe_open(bundle, framework="pt") as f:
        meta = json.loads(f.metadata()["mass_ext"])
    edit(meta)
    edited = tmp_path / "edited.safetensors"
    save_file(load_file(bundle), edited, metadata={"mass_ext": json.dumps(meta)})
    assert_error(capsys, ["info", edited], str(edited), expected)
