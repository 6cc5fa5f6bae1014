"""Hostile output paths: --force, --resume and overwrites never touch what is not cstar's own run or file.

Every case is refused in one line before any work, and the whole test folder
(the working directory, home, unrelated folders, other runs) is byte for byte
as it was.
"""

import os

import pytest

import cstar
from cstar import models
from hostile import refused_cli
from runs import held_lock, make_run, snapshot

TRAIN = ["train", "--model", "small_cnn", "--data", "digits"]
COMPRESS = ["compress", "--model", "small_cnn", "--data", "digits"]
COMPARE = ["compare", "--model", "small_cnn", "--data", "digits"]
NOT_RUN = ["not a cstar run", "nothing was deleted"]
NO_RUN = ["no cstar run", "to resume"]

# (id, argv ({tmp}: the test folder; the working directory is {tmp}/work, home {tmp}/home/user),
#  words of the error line, a run directory held by another process (or None), paths that must not appear)
CASES = [
    # --force: never the working directory, its parents, home, /, a link, or a folder that is not a run
    ("force-dot", [*TRAIN, "--out", ".", "--force"], ["never empties", "working directory"], None, []),
    ("force-cwd-by-its-path", [*TRAIN, "--out", "{tmp}/work", "--force"], ["working directory"], None, []),
    ("force-dotdot", [*TRAIN, "--out", "..", "--force"], ["parent of the working directory"], None, []),
    ("force-parent-by-its-path", [*COMPRESS, "--out", "{tmp}", "--force"], ["parent of the working directory"],
     None, []),
    ("force-home", [*TRAIN, "--out", "{tmp}/home/user", "--force"], ["your home directory"], None, []),
    ("force-home-with-a-trailing-slash", [*COMPARE, "--out", "{tmp}/home/user/", "--force"], ["your home directory"],
     None, []),
    ("force-parent-of-home", [*TRAIN, "--out", "{tmp}/home", "--force"], ["parent of your home"], None, []),
    ("force-root", [*TRAIN, "--out", "/", "--force"], ["root of the file system"], None, []),
    ("force-symlink-to-a-run", [*TRAIN, "--out", "{tmp}/link", "--force"], ["symbolic link", "nothing was deleted"],
     None, []),
    ("force-unrelated-folder", [*TRAIN, "--out", "{tmp}/mine", "--force"], NOT_RUN, None, []),
    ("compress-force-unrelated-folder", [*COMPRESS, "--out", "{tmp}/mine", "--force"], NOT_RUN, None, []),
    ("compare-force-unrelated-folder", [*COMPARE, "--out", "{tmp}/mine", "--force"], NOT_RUN, None, []),
    ("demo-force-unrelated-folder", ["demo", "--out", "{tmp}/mine", "--force"], NOT_RUN, None, []),
    ("demo-force-dot", ["demo", "--out", ".", "--force"], ["working directory"], None, []),
    ("force-folder-with-only-a-config-yaml", [*TRAIN, "--out", "{tmp}/yaml_only", "--force"], NOT_RUN, None, []),
    ("force-folder-with-a-foreign-env-json", [*TRAIN, "--out", "{tmp}/foreign_env", "--force"], NOT_RUN, None, []),
    ("force-dot-from-a-config-file", [*TRAIN, "--config", "{tmp}/out_dot.yaml", "--force"], ["working directory"],
     None, []),
    # a run directory another process is running in
    ("force-a-run-in-use", [*TRAIN, "--out", "{tmp}/run_train", "--force"], ["in use by another cstar run"],
     "run_train", []),
    ("new-run-into-a-run-in-use", [*TRAIN, "--out", "{tmp}/run_train"], ["in use", "wait for that run"],
     "run_train", []),
    ("resume-a-run-in-use", ["train", "--resume", "--out", "{tmp}/run_train"], ["in use"], "run_train", []),
    # --resume: only a run of the same command
    ("resume-missing", ["train", "--resume", "--out", "{tmp}/missing"], ["no run in", "does not exist"], None,
     ["{tmp}/missing"]),
    ("compress-resume-missing", ["compress", "--resume", "--out", "{tmp}/missing"], ["no run in", "to resume"], None,
     ["{tmp}/missing"]),
    ("resume-unrelated-folder", ["train", "--resume", "--out", "{tmp}/mine"], NO_RUN, None, []),
    ("resume-empty-folder", ["compare", "--resume", "--out", "{tmp}/empty"], NO_RUN, None, []),
    ("resume-and-force", ["train", "--resume", "--force", "--out", "{tmp}/run_train"], ["only one of them"], None,
     []),
    ("resume-without-out", ["train", "--resume"], ["pass --out"], None, ["{tmp}/work/runs"]),
    ("compress-resume-of-a-train-run", ["compress", "--resume", "--out", "{tmp}/run_train"],
     ["'cstar train' run", "cstar train --resume"], None, []),
    ("compare-resume-of-a-compress-run", ["compare", "--resume", "--out", "{tmp}/run_compress"],
     ["'cstar compress' run"], None, []),
    ("train-resume-of-a-compare-run", ["train", "--resume", "--out", "{tmp}/run_compare"], ["'cstar compare' run"],
     None, []),
    ("compress-resume-of-an-old-train-run", ["compress", "--resume", "--out", "{tmp}/old_train"],
     ["another command's run", "epochs"], None, []),
    ("train-resume-of-an-old-compare-run", ["train", "--resume", "--out", "{tmp}/old_compare"],
     ["another command's run", "ratios"], None, []),
    # a new run into a folder that is not a run, or a broken link
    ("new-run-into-an-unrelated-folder", [*TRAIN, "--out", "{tmp}/mine"], ["not a cstar run", "choose another --out"],
     None, []),
    ("new-run-into-a-folder-with-a-foreign-env-json", [*COMPRESS, "--out", "{tmp}/foreign_env"], ["not a cstar run"],
     None, []),
    ("out-is-a-broken-link", [*TRAIN, "--out", "{tmp}/broken"], ["broken symbolic link"], None, []),
    # overwrites of single outputs: refused without --force
    ("decompose-onto-an-existing-save", ["decompose", "{tmp}/save", "--ratio", "2", "--out", "{tmp}/save"],
     ["already exists", "--force"], None, []),
    ("decompose-force-onto-an-unrelated-folder", ["decompose", "{tmp}/save", "--ratio", "2", "--out", "{tmp}/mine",
                                                  "--force"], ["not a cstar model"], None, []),
    ("decompose-force-onto-a-file", ["decompose", "{tmp}/save", "--ratio", "2", "--out", "{tmp}/afile", "--force"],
     ["is a file"], None, []),
    ("eval-json-onto-an-existing-file", ["eval", "{tmp}/save", "--n", "10", "--json", "{tmp}/old.json"],
     ["already exists", "--force"], None, []),
    ("ranks-json-onto-an-existing-file", ["ranks", "--model", "small_cnn", "--data", "digits", "--ratio", "2",
                                          "--json", "{tmp}/old.json"], ["already exists", "--force"], None, []),
]


def _layout(tmp, monkeypatch):
    """The test folder: the working directory and home (each a cstar run, so only the place protects them),
    an unrelated folder, runs of each command with and without the marker, a link, a file, a save."""
    for place in ("work", "home/user"):
        make_run(tmp / place, "train")
    monkeypatch.chdir(tmp / "work")
    monkeypatch.setenv("HOME", str(tmp / "home" / "user"))
    (tmp / "mine").mkdir()
    (tmp / "mine" / "thesis.tex").write_text("years of work")
    for command in ("train", "compress", "compare"):
        make_run(tmp / f"run_{command}", command)
    make_run(tmp / "old_train", "train", marked=False)
    make_run(tmp / "old_compare", "compare", marked=False)
    os.symlink(tmp / "run_train", tmp / "link")
    os.symlink(tmp / "nowhere", tmp / "broken")
    (tmp / "afile").write_text("a file")
    (tmp / "empty").mkdir()
    (tmp / "yaml_only").mkdir()
    (tmp / "yaml_only" / "config.yaml").write_text("model: mine\n")
    (tmp / "foreign_env").mkdir()
    (tmp / "foreign_env" / "env.json").write_text('{"python": "3.11"}')
    (tmp / "out_dot.yaml").write_text("out: .\n")
    (tmp / "old.json").write_text('{"mine": true}')
    cstar.save(models.create("small_cnn", 10, in_channels=1, input_size=8), tmp / "save")


@pytest.mark.parametrize("argv, words, held, left", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_output_paths_are_refused_and_touch_nothing(capsys, tmp_path, monkeypatch, argv, words, held, left):
    _layout(tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    left = [p.replace("{tmp}", str(tmp_path)) for p in left]
    if held:
        with held_lock(tmp_path / held):
            refused_cli(capsys, argv, words, tmp=tmp_path, left=left)
    else:
        refused_cli(capsys, argv, words, tmp=tmp_path, left=left)
    assert snapshot(tmp_path) == before
