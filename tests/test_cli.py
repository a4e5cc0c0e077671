"""One command-line layer: every gin entry point rejects unknown flags, misspelled macros and misspelled fields the
same way (exit status 2, the name in the message), before anything is built; each --help states its own purpose,
--gin_file, --gin.NAME=VALUE and its macros; gin is imported only by engram_jax.configurables; no import cycles."""

import ast
from pathlib import Path

import pytest

from engram_jax import budget, cli, eval as eval_lib, train
from engram_jax.experiments import sparsity_allocation as sweep_lib

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {  # entry -> (main, flags that make a valid command)
    "train": (train.main, ["--gin_file=configs/experiments/quickstart.gin"]),
    "evaluate": (eval_lib.main, ["--gin.CHECKPOINT_PATH=/nonexistent/run"]),
    "budget": (budget.main, ["--gin_file=configs/experiments/budget_2e20.gin"]),
    "sparsity_allocation": (sweep_lib.main, ["--gin_file=configs/experiments/sparsity_allocation_toy.gin"]),
}


@pytest.mark.parametrize("kind", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("bad, message", [
    ("--gin.TRAIN_STPES=2000", "no macro 'TRAIN_STPES' is declared"),
    ("--gin.RunConfig.stpes=3", "RunConfig.stpes = 3"),
    ("--gin.SweepConfg.rhos=(1.0,)", "No configurable matching 'SweepConfg'"),
])
def test_every_entry_point_rejects_misspelled_bindings_the_same_way(kind, bad, message, capsys):
  main, flags = ENTRY_POINTS[kind]
  with pytest.raises(SystemExit) as e:
    main(flags + [bad])
  err = capsys.readouterr().err
  assert e.value.code == cli.EXIT_CONFIG and message in err and cli.ENTRIES[kind].prog in err


@pytest.mark.parametrize("kind", sorted(ENTRY_POINTS))
def test_unknown_flags_are_errors(kind, capsys):
  main, flags = ENTRY_POINTS[kind]
  with pytest.raises(SystemExit) as e:
    main(flags + ["--steps=3"])
  assert e.value.code == 2 and "unrecognized argument '--steps=3'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", sorted(ENTRY_POINTS))
def test_help_states_its_own_purpose_flags_and_macros(kind, capsys):
  main, _ = ENTRY_POINTS[kind]
  with pytest.raises(SystemExit) as e:
    main(["--help"])
  text = capsys.readouterr().out
  entry = cli.ENTRIES[kind]
  assert e.value.code == 0 and entry.purpose in " ".join(text.split("\n")) and entry.prog in text
  assert "--gin_file" in text and "--gin.NAME=VALUE" in text and "examples:" in text
  assert all(macro in text for macro, _ in entry.macros)
  others = [e.purpose for k, e in cli.ENTRIES.items() if k != kind]
  assert not any(p in text for p in others)


def test_a_typo_in_the_sweep_no_longer_trains_the_default():
  """--gin.TRAIN_STPES=2000 used to train the file's 500 steps silently (the sweep had its own parser)."""
  with pytest.raises(SystemExit):
    sweep_lib.main(["--gin_file=configs/experiments/sparsity_allocation_cpu.gin", "--gin.TRAIN_STPES=2000"])


def _top_level_imports(path: Path) -> set[str]:
  """engram_jax modules a file imports at module level (imports inside functions are deliberate and lazy)."""
  out = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out |= {f"{node.module}.{a.name}" for a in node.names}
  return {m for m in out if m.startswith("engram_jax")}


def test_gin_is_imported_only_by_configurables_and_modules_have_no_import_cycles():
  files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
           for p in (REPO / "engram_jax").rglob("*.py")}
  gin_users = sorted(m for m, p in files.items() if "import gin" in p.read_text())
  assert gin_users == ["engram_jax.configurables"]
  graph = {m: {i for i in _top_level_imports(p) if i in files and i != m} for m, p in files.items()}
  state = {}

  def visit(m, stack):
    state[m] = "open"
    for n in graph[m]:
      assert state.get(n) != "open", f"import cycle: {' -> '.join(stack + [m, n])}"
      if n not in state:
        visit(n, stack + [m])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [])
