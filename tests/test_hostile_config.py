"""Hostile and unusual input to the config and command-line readers, and the run folder's safety (issue 23).

Every bad input is one line (`footprints: error: <file or key>: <reason>`, exit 2), never a traceback, a hang
or a file outside `output_root`; `--overwrite` deletes only what runs of the stage wrote; one run per output
folder at a time (a lock file), and cleanup never touches a live run's files. Runner tests use a fake stage
module (written below) so that they run in a fraction of a second; processes are ordered by pipes, never by
sleeping.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from footprints import runner
from footprints.cli import main
from footprints.config import SEED_MAX, ConfigError, load_config
from footprints.errors import StageError
from footprints.runtime.lock import FolderBusy, hold, lock_path

REPO = Path(__file__).resolve().parents[1]

# a stand-in stage: FAKE_MODE=write (two output files), wait (a live temporary file, "started" on stdout, then
# finish on a line from stdin), kill (write, leave a temporary, then SIGKILL itself), fail
FAKE_STAGE = '''
import os, signal, sys
from pathlib import Path
from footprints.contracts.paths import RunPaths
from footprints.errors import StageError


def run(cfg, overwrite=False, inputs=None, output=None, **_):
    out = Path(output) if output else None
    folder = out.with_name(out.stem + "_scenes") if out else RunPaths.of(cfg).stage("tile")
    folder.mkdir(parents=True, exist_ok=True)
    mode = os.environ.get("FAKE_MODE", "write")
    text = os.environ.get("FAKE_TEXT", "new")
    if mode == "fail":
        raise StageError("fake failure")
    if mode == "wait":
        tmp = folder / ".out.txt.live.part"
        tmp.write_text(text)
        print("started", flush=True)
        sys.stdin.readline()
        os.replace(tmp, folder / "out.txt")
        return {"status": "waited"}
    (folder / "out.txt").write_text(text)
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "b.bin").write_text(text)
    if mode == "kill":
        (folder / "killed.txt").write_text("partial")
        (folder / ".k.txt.x1.part").write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)
    return {"status": "written"}
'''

# a process running one stage (the fake one) with the runner, as `footprints <stage>` would
DRIVER = '''
import json, sys
from footprints import runner
from footprints.config import load_config
from footprints.errors import FootprintsError

stage, sets, options = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
runner.STAGE_MODULES[stage] = "fake_stage"
try:
    result = runner.run_stage(stage, load_config(None, sets), **options)
except FootprintsError as err:
    print("error:", err, flush=True)
    sys.exit(2)
print("done", json.dumps(result), flush=True)
'''


@pytest.fixture(scope="session")
def fake_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fake")
    (folder / "fake_stage.py").write_text(FAKE_STAGE)
    (folder / "driver.py").write_text(DRIVER)
    return folder


@pytest.fixture
def fake(fake_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake stage in this process, as `tile` and `predict`."""
    monkeypatch.syspath_prepend(str(fake_dir))
    monkeypatch.setitem(runner.STAGE_MODULES, "tile", "fake_stage")
    monkeypatch.setitem(runner.STAGE_MODULES, "predict", "fake_stage")
    monkeypatch.setenv("FAKE_MODE", "write")
    return fake_dir


def sets(tmp_path: Path, name: str = "r") -> list[str]:
    return [f"output_root={tmp_path / 'out'}", f"name={name}"]


def start(fake_dir: Path, stage: str, setting: list[str], mode: str, env: dict[str, str] | None = None,
          **options: object) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": f"{fake_dir}{os.pathsep}{REPO}", "FAKE_MODE": mode, **(env or {})}
    return subprocess.Popen([sys.executable, str(fake_dir / "driver.py"), stage, json.dumps(setting),
                             json.dumps(options)], env=full, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`footprints ARGS` in this process: the exit code and the one error line (asserted to be one)."""
    code = main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("footprints: error:")]
    assert len(lines) <= 1 and (code == 0 or len(lines) == 1), err
    return code, lines[0] if lines else ""


def refused(path: Path | None, overrides: list[str] | None = None) -> str:
    """The one-line ConfigError of loading `path` (and `overrides`)."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides or [])
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    return message


# ------------------------------------------------------------------- 1. the run name stays one folder name


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a\\b", "a\tb", "x" * 101, "r\u2024n", "a:b", "*"])
def test_name_that_is_not_one_plain_folder_name_is_refused(tmp_path: Path, name: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"name: {json.dumps(name)}\n")
    message = refused(config)
    assert message.startswith(f"{config}: name: must be a plain folder name")
    assert refused(None, [f"name={json.dumps(name)}"]).startswith("<defaults> (with --set overrides): name:")


@pytest.mark.parametrize("name", ["a/../..", "/tmp/x", ""])
def test_name_with_a_slash_or_empty_stays_refused(name: str) -> None:
    assert ": name: must be a plain folder name" in refused(None, [f"name={json.dumps(name)}"])


def test_plain_names_still_load() -> None:
    for name in ("demo", "xview2-joplin", "run_1.v2", "A-fold3"):
        assert load_config(None, [f"name={name}"]).name == name


def test_overwrite_with_name_dotdot_touches_nothing_outside_output_root(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "tile" / "mine.txt"  # <output_root>/../tile is the user's folder
    mine.parent.mkdir()
    mine.write_text("the user's")
    code, line = cli(capsys, "tile", "--overwrite", "--set", f"output_root={tmp_path / 'out'}", "--set", "name=..")
    assert code == 2 and "name: must be a plain folder name" in line and "'..'" in line
    assert mine.read_text() == "the user's" and sorted(p.name for p in mine.parent.iterdir()) == ["mine.txt"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("root", ['"out\\0x"', '"out\\x01"', '"out\\nx"', '"  "'])
def test_output_root_with_a_nul_or_control_character_is_refused(root: str) -> None:
    assert "output_root: must" in refused(None, [f"output_root={root}"])


def test_output_root_with_a_tilde_is_refused_not_made_into_a_folder_named_tilde(tmp_path: Path) -> None:
    assert "output_root: '~' is not expanded" in refused(None, ["output_root=~/runs"])


# -------------------------------------------------------------- 2. hostile config files: one line each


def _alias_bomb(key_path: str) -> str:
    lines = [f"{key_path}:", '  - &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"  - &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


HOSTILE_FILES = {
    "random bytes": (bytes(np.random.default_rng(23).integers(0, 256, 4096, dtype=np.uint8)), "not UTF-8 text"),
    "a NUL byte in a string": (b'name: "a\\0b"\n', "name: must not contain a NUL byte"),
    "a raw NUL byte": (b"name: a\x00b\n", "invalid YAML"),
    "a seed beyond 64 bits": (b"seed: 99999999999999999999999\n", "seed: must be in [0, 4294967295]"),
    "a seed beyond 32 bits": (b"seed: 4294967296\n", "seed: must be in [0, 4294967295]"),
    "Latin-1 text": ("name: caf\u00e9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 9)"),
    "an alias bomb": (_alias_bomb("name").encode(), "an alias bomb"),
    "an alias bomb in an Any key": (_alias_bomb("backbone:\n  layers").encode(), "an alias bomb"),
    "deep nesting": (b"name: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested more than 32 levels deep"),
    "deep nesting in an Any key": (b"backbone:\n  layers: " + b"[" * 40 + b"]" * 40 + b"\n", "nested more than"),
    "a recursive alias": (b"backbone:\n  layers: &a [conv1_1, *a]\n", "an alias refers to itself"),
}


@pytest.mark.timeout(120)  # a hang guard only: each case answers at once
@pytest.mark.parametrize("case", list(HOSTILE_FILES))
def test_hostile_config_file_is_one_line_naming_the_file(tmp_path: Path, case: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    data, reason = HOSTILE_FILES[case]
    config = tmp_path / "hostile.yaml"
    config.write_bytes(data)
    assert reason in refused(config)
    code, line = cli(capsys, "tile", "--config", str(config), "--set", f"output_root={tmp_path / 'out'}")
    assert code == 2 and line.startswith(f"footprints: error: {config}") and reason in line
    assert not (tmp_path / "out").exists()  # refused before anything is touched


def test_every_seed_the_config_accepts_is_one_numpy_torch_and_scikit_learn_take() -> None:
    import torch
    from sklearn.utils import check_random_state

    from footprints.training.data import derive_seed

    seed = load_config(None, [f"seed={SEED_MAX}"]).seed
    np.random.default_rng(seed)
    check_random_state(seed)  # LogisticRegression(random_state=cfg.seed) in train-classifier
    torch.manual_seed(seed)
    torch.Generator().manual_seed(seed)
    np.random.default_rng(derive_seed(seed, "permutation", 3))
    assert "seed: must be in [0, 4294967295], got -1" in refused(None, ["seed=-1"])


# -------------------------------------------------- 3. --overwrite deletes only what the stage wrote


def test_overwrite_keeps_a_users_file_in_the_stage_folder(tmp_path: Path, fake: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(None, sets(tmp_path))
    tile = tmp_path / "out" / "r" / "tile"
    runner.run_stage("tile", cfg)
    (tile / "notes.txt").write_text("the user's notes")
    (tile / "sub" / "mine.csv").write_text("the user's table")
    (tile / ".notes.tmp").write_text("the user's, named like a temporary")
    monkeypatch.setenv("FAKE_TEXT", "second")
    assert runner.run_stage("tile", cfg, overwrite=True)["status"] == "written"
    assert (tile / "out.txt").read_text() == "second" and not (tile / "notes.txt").exists()
    kept = list((tmp_path / "out" / "r").glob("tile.kept-*"))
    assert len(kept) == 1, list((tmp_path / "out" / "r").iterdir())
    assert (kept[0] / "notes.txt").read_text() == "the user's notes"
    assert (kept[0] / "sub" / "mine.csv").read_text() == "the user's table"
    assert (kept[0] / ".notes.tmp").is_file()
    assert sorted(str(p.relative_to(kept[0])) for p in kept[0].rglob("*") if p.is_file()) == [
        ".notes.tmp", "notes.txt", "sub/mine.csv"]  # the stage's own old files went
    assert "--overwrite kept them in" in caplog.text and str(kept[0]) in caplog.text
    # a third run with nothing foreign left keeps nothing more
    runner.run_stage("tile", cfg, overwrite=True)
    assert len(list((tmp_path / "out" / "r").glob("tile.kept-*"))) == 1


def test_overwrite_refuses_a_stage_folder_that_is_a_symlink(tmp_path: Path, fake: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not the run's")
    run_dir = tmp_path / "out" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "tile").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(StageError, match=r"tile: is a symbolic link \(to .*elsewhere\); --overwrite replaces only"):
        runner.run_stage("tile", load_config(None, sets(tmp_path)), overwrite=True)
    assert (run_dir / "tile").is_symlink() and (elsewhere / "keep.txt").read_text() == "not the run's"
    assert not (run_dir / ".tile.replaced").exists() and sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]


def test_a_run_killed_outright_is_accounted_for_at_the_next_start(tmp_path: Path, fake: Path) -> None:
    cfg = load_config(None, sets(tmp_path))
    tile = tmp_path / "out" / "r" / "tile"
    runner.run_stage("tile", cfg)
    (tile / "notes.txt").write_text("the user's")
    killed = start(fake, "tile", sets(tmp_path), "kill")
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    assert (tile / "killed.txt").is_file() and (tile / ".k.txt.x1.part").is_file()
    runner.run_stage("tile", cfg, overwrite=True)
    kept = list((tmp_path / "out" / "r").glob("tile.kept-*"))
    # the killed run's files (its temporary too) were the stage's: deleted; the user's file is kept
    assert len(kept) == 1 and sorted(p.name for p in kept[0].rglob("*")) == ["notes.txt"]
    assert sorted(str(p.relative_to(tile)) for p in tile.rglob("*")) == ["out.txt", "sub", "sub/b.bin"]


def test_overwrite_of_a_folder_without_a_record_deletes_nothing(tmp_path: Path, fake: Path) -> None:
    tile = tmp_path / "out" / "r" / "tile"
    tile.mkdir(parents=True)
    (tile / "made-by-hand.txt").write_text("x")  # before any run (or by a version without records)
    runner.run_stage("tile", load_config(None, sets(tmp_path)), overwrite=True)
    kept = list((tmp_path / "out" / "r").glob("tile.kept-*"))
    assert len(kept) == 1 and (kept[0] / "made-by-hand.txt").read_text() == "x"


def test_a_failed_overwrite_puts_everything_back(tmp_path: Path, fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None, sets(tmp_path))
    tile = tmp_path / "out" / "r" / "tile"
    runner.run_stage("tile", cfg)
    (tile / "notes.txt").write_text("the user's")
    monkeypatch.setenv("FAKE_MODE", "fail")
    with pytest.raises(StageError, match="fake failure"):
        runner.run_stage("tile", cfg, overwrite=True)
    assert sorted(str(p.relative_to(tile)) for p in tile.rglob("*")) == ["notes.txt", "out.txt", "sub", "sub/b.bin"]
    monkeypatch.setenv("FAKE_MODE", "write")
    runner.run_stage("tile", cfg, overwrite=True)  # the record still tells the stage's files from the user's
    kept = list((tmp_path / "out" / "r").glob("tile.kept-*"))
    assert len(kept) == 1 and sorted(p.name for p in kept[0].iterdir()) == ["notes.txt"]


# ------------------------------------------------------------- 4. one run per output folder at a time


def test_a_second_run_on_the_same_folder_is_refused_and_the_first_completes(
        tmp_path: Path, fake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = start(fake, "tile", sets(tmp_path), "wait")
    try:
        assert first.stdout.readline().strip() == "started"  # it holds the lock and writes a temporary file
        live = tmp_path / "out" / "r" / "tile" / ".out.txt.live.part"
        assert live.is_file()
        code, line = cli(capsys, "tile", "--set", f"output_root={tmp_path / 'out'}", "--set", "name=r")
        assert code == 2, line
        assert f"footprints: error: {tmp_path / 'out' / 'r'}: in use by another footprints run (pid {first.pid} on " in line
        assert "driver.py tile" in line and "wait for it to end" in line
        assert live.read_text() == "new"  # the second run's start-up cleanup never touched it
        out, err = first.communicate("go\n")
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0 and "done" in out, err
    assert (tmp_path / "out" / "r" / "tile" / "out.txt").read_text() == "new"
    # the first has ended: the second runs now
    code, line = cli(capsys, "tile", "--set", f"output_root={tmp_path / 'out'}", "--set", "name=r")
    assert code == 0, line


def test_a_lock_left_by_a_killed_run_is_harmless(tmp_path: Path, fake: Path) -> None:
    first = start(fake, "tile", sets(tmp_path), "wait")
    assert first.stdout.readline().strip() == "started"
    with pytest.raises(FolderBusy):
        runner.run_stage("tile", load_config(None, sets(tmp_path)))
    first.kill()
    first.communicate()
    assert lock_path(tmp_path / "out" / "r").is_file()
    assert runner.run_stage("tile", load_config(None, sets(tmp_path)))["status"] == "written"
    # the killed run's live temporary is now a stale one of the stage, removed at that start
    assert not (tmp_path / "out" / "r" / "tile" / ".out.txt.live.part").exists()


def test_two_predicts_on_the_same_output_file(tmp_path: Path, fake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "result" / "fp.geojson"
    scene = tmp_path / "scene.tif"
    scene.write_bytes(b"")
    first = start(fake, "predict", sets(tmp_path), "wait", inputs=[str(scene)], output=str(output))
    try:
        assert first.stdout.readline().strip() == "started"
        code, line = cli(capsys, "predict", "--input", str(scene), "--output", str(output),
                         "--set", f"output_root={tmp_path / 'out'}")
        assert code == 2 and f"{output.parent}: in use by another footprints run (pid {first.pid}" in line
        assert (tmp_path / "result" / "fp_scenes" / ".out.txt.live.part").is_file()
        # another output file in the same folder is another run's business: not locked
        other = runner.run_stage("predict", load_config(None, sets(tmp_path)), inputs=[str(scene)],
                                 output=str(output.with_name("other.geojson")))
        assert other["status"] == "written"
        first.communicate("go\n")
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0
    assert (tmp_path / "result" / "fp_scenes" / "out.txt").is_file()


def test_the_lock_is_reentrant_in_one_process_and_not_taken_by_other_ranks(tmp_path: Path, fake: Path) -> None:
    cfg = load_config(None, sets(tmp_path))
    run_dir = tmp_path / "out" / "r"
    with hold(run_dir):  # as `footprints all` holds it around every stage
        assert runner.run_stage("tile", cfg)["status"] == "written"
        # rank 1 of a data-parallel job works under rank 0's lock: it never takes it, so never waits on it
        rank1 = start(fake, "tile", sets(tmp_path), "write", env={"RANK": "1", "WORLD_SIZE": "2"})
        out, err = rank1.communicate()
        assert rank1.returncode == 0 and out.startswith("done"), err
        # another main process is refused while this one holds it
        other = start(fake, "tile", sets(tmp_path), "write")
        out, err = other.communicate()
        assert other.returncode == 2 and f"in use by another footprints run (pid {os.getpid()} on" in out, err
    other = start(fake, "tile", sets(tmp_path), "write")
    out, err = other.communicate()
    assert other.returncode == 0, out + err


def test_a_lock_file_planted_as_a_symlink_never_truncates_its_target(tmp_path: Path, fake: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run_dir = tmp_path / "out" / "r"
    run_dir.mkdir(parents=True)
    lock_path(run_dir).symlink_to(victim)
    with pytest.raises(StageError, match="the lock file is a symbolic link; remove it"):
        runner.run_stage("tile", load_config(None, sets(tmp_path)))
    assert victim.read_text() == "precious"


def test_a_file_system_without_locks_runs_unlocked_and_removes_no_temporaries(
        tmp_path: Path, fake: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import fcntl

    tile = tmp_path / "out" / "r" / "tile"
    tile.mkdir(parents=True)
    stale = tile / ".x.tif.abc.part"
    stale.write_text("maybe a live run's")

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert runner.run_stage("tile", load_config(None, sets(tmp_path)))["status"] == "written"
    assert "cannot lock files" in caplog.text and stale.is_file()


# ---------------------------------------------------------------- 5. more hostile config and CLI input


def test_config_path_that_is_a_folder(tmp_path: Path) -> None:
    assert refused(tmp_path) == f"{tmp_path}: is a folder, not a config file"


@pytest.mark.timeout(120)  # a hang guard only: opening a FIFO without a writer used to block forever
def test_config_path_that_is_a_fifo_never_blocks(tmp_path: Path) -> None:
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    assert refused(fifo) == f"{fifo}: not a regular file (a FIFO, device or socket); give a YAML file"


@pytest.mark.timeout(120)  # a hang guard only: /dev/zero used to be read until memory ran out
def test_config_path_that_is_an_endless_device() -> None:
    assert refused(Path("/dev/zero")) == "/dev/zero: not a regular file (a FIFO, device or socket); give a YAML file"


def test_config_file_too_large_to_be_a_config(tmp_path: Path) -> None:
    huge = tmp_path / "huge.yaml"
    huge.write_text("name: x\n" + "#" * (2 << 20) + "\n")
    assert refused(huge) == f"{huge}: larger than 1024 KiB; a config file is a short YAML text"


@pytest.mark.parametrize("override", ["=1", "a..b=1", "tile..size=3", ".name=x", "name.=x", " =1"])
def test_set_with_an_empty_part_in_the_key(override: str) -> None:
    assert "expected section.key=value, with no empty part in the key" in refused(None, [override])


@pytest.mark.parametrize(("override", "reason"), [
    ("name=[1", "invalid YAML at line 1"),
    ("name=a\bb", "invalid YAML"),  # a control character
    ("name={a: 1, a: 2}", "key 'a' appears twice"),
    ("seed=!!python/object/apply:os.system [touch pwned]", "could not determine a constructor"),
    ("name=&a [*a]", "an alias refers to itself"),
])
def test_set_value_that_is_not_plain_yaml_is_one_line(tmp_path: Path, override: str, reason: str,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert reason in refused(None, [override])
    code, line = cli(capsys, "tile", "--set", override)
    assert code == 2 and line.startswith("footprints: error: --set ") and reason in line
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("text", [
    "name: !!python/object/apply:os.system ['touch pwned']\n",
    "? !!python/object/apply:os.system ['touch pwned']\n: 1\n",
    "tile: !!python/name:os.system\n",
])
def test_python_yaml_tags_never_run_and_are_one_line(tmp_path: Path, text: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert "invalid YAML at line" in refused(config) and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(("text", "reason"), [
    ("cluster:\n  slurm: [1, 2]\n", "cluster.slurm: expected a mapping, got list [1, 2]"),
    ("tile: [size, 64]\n", "tile: expected a mapping, got list"),
    ("- name: x\n", "top level: expected a mapping of sections"),
    ("tile:\n  subset_splits: [train]\n", "tile.subset_splits: expected a mapping"),
    ("name: x\n---\nname: y\n", "invalid YAML"),
])
def test_a_list_where_a_mapping_is_expected(tmp_path: Path, text: str, reason: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert reason in refused(config)


def test_a_homoglyph_key_says_which_character_is_not_ascii(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("n\u0430me: x\n")  # a Cyrillic a
    assert refused(config) == (f"{config}: unknown key 'n\u0430me'; did you mean 'name'? (it contains U+0430 "
                               "CYRILLIC SMALL LETTER A, which is not an ASCII letter)")


@pytest.mark.parametrize(("text", "reason"), [
    ("classifier:\n  weight_decay: .inf\n", "classifier.weight_decay: expected a finite number, got inf"),
    ("cluster:\n  slurm:\n    startup_timeout: .inf\n", "cluster.slurm.startup_timeout: expected a finite number"),
    ("predict:\n  min_area_m2: 1.0e+999\n", "predict.min_area_m2: expected a finite number"),
    ("data:\n  nodata: .nan\n", "data.nodata: expected a finite number, got nan"),
    ("classifier:\n  lr: " + "9" * 400 + "\n", "classifier.lr: expected a finite number, got inf"),
    ("tile:\n  stride: " + "9" * 30 + "\n", "tile.stride: must fit in 64 bits"),
    ("features:\n  per_class: " + "9" * 5000 + "\n", "invalid YAML value (a number of more than 4300 digits)"),
    ("tile:\n  size: -1\n", "tile.size: must be in [16, 8192], got -1"),
    ("segmenter:\n  lr: .NaN\n", "segmenter.lr: expected a finite number"),
])
def test_infinite_nan_and_oversized_numbers(tmp_path: Path, text: str, reason: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert reason in refused(config)


def test_a_string_key_given_a_yaml_boolean_or_number_says_to_quote_it() -> None:
    assert refused(None, ["name=yes"]).endswith("name: expected a string, got True (write it in quotes to mean "
                                                "the text)")


def test_a_config_in_utf16_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_bytes("name: windows\r\ntile:\r\n  size: 64\r\n  stride: 64\r\n".encode("utf-16"))
    cfg = load_config(config)
    assert cfg.name == "windows" and cfg.tile.size == 64


def test_a_config_path_with_a_line_break_is_still_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, line = cli(capsys, "tile", "--config", str(tmp_path / "a\nb.yaml"))
    assert code == 2 and "cannot read config" in line and "a\\nb.yaml" in line


def test_output_root_that_is_a_file(tmp_path: Path, fake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").write_text("a file")
    code, line = cli(capsys, "tile", "--set", f"output_root={tmp_path / 'out'}")
    assert code == 2 and line == f"footprints: error: {tmp_path / 'out'}: output_root is a file, not a folder"
    assert (tmp_path / "out").read_text() == "a file"


def test_output_root_under_a_missing_parent_is_made(tmp_path: Path, fake: Path) -> None:
    cfg = load_config(None, [f"output_root={tmp_path / 'a' / 'b' / 'c'}", "name=r"])
    assert runner.run_stage("tile", cfg)["status"] == "written"
    assert (tmp_path / "a" / "b" / "c" / "r" / "tile" / "out.txt").is_file()


def test_output_root_that_cannot_be_written_is_one_line(read_only_dir: tuple[Path, str], fake: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out, reason = read_only_dir
    code, line = cli(capsys, "tile", "--set", f"output_root={out}", "--set", "name=r")
    assert code == 2 and line == f"footprints: error: {reason} (cannot write {out / 'r'})"


def test_predict_output_in_a_folder_that_cannot_be_written(tmp_path: Path, read_only_dir: tuple[Path, str],
                                                            fake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, reason = read_only_dir
    scene = tmp_path / "scene.tif"
    scene.write_bytes(b"")
    code, line = cli(capsys, "predict", "--input", str(scene), "--output", str(out / "fp.geojson"),
                     "--set", f"output_root={tmp_path / 'runs'}")
    assert code == 2 and line == f"footprints: error: {reason} (cannot write {out})"


def test_predict_cleanup_outside_the_runner_never_removes_a_live_runs_temporary(tmp_path: Path, fake: Path) -> None:
    from footprints.runtime.lock import remove_output_temporaries

    output = tmp_path / "result" / "fp.geojson"
    scenes = tmp_path / "result" / "fp_scenes"
    first = start(fake, "predict", sets(tmp_path), "wait", inputs=["x.tif"], output=str(output))
    try:
        assert first.stdout.readline().strip() == "started"
        with pytest.raises(FolderBusy, match=f"pid {first.pid} on"):
            remove_output_temporaries(scenes, output)
        assert (scenes / ".out.txt.live.part").is_file()
        first.kill()
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert remove_output_temporaries(scenes, output) == 1  # its holder is dead: now a stale one
    assert not (scenes / ".out.txt.live.part").exists()
