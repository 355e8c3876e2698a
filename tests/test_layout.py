"""The package's shape checks itself: layers import only downwards, no module cycle, no import
hidden inside a function, no file over 400 lines (BUILD_NOTES.md, "Layout"); housekeeping keeps runs."""

import ast
import pathlib
import subprocess

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lmjax"
# Bottom to top: a module may import its own layer and the layers before it, never one after it.
LAYERS = (
  "core",
  "ops",
  "model",
  "data",
  "run",
  "pretrained",
  "inference",
  "tasks",
  "train",
  "research",
  "cli",
)
MAX_LINES = 400


def modules() -> dict:
  """{dotted module name: parsed file} for every file of the package."""
  found = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    found[name] = (path, ast.parse(path.read_text(encoding="utf-8")))
  return found


MODULES = modules()


def lmjax_imports(tree, top_level_only: bool) -> list:
  """(line, imported module) for each import of an lmjax module; `from lmjax.x import y` counts
  as lmjax.x.y when that is a module (else lmjax.x)."""
  nodes = tree.body if top_level_only else list(ast.walk(tree))
  found = []
  for node in nodes:
    if isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lmjax"]
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lmjax":
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        found.append((node.lineno, full if full in MODULES else node.module))
  return found


# Top-level modules: the commands' names before the cli layer (`python -m lmjax.main`), aliases of it.
COMMAND_ALIASES = (
  "lmjax.main",
  "lmjax.prepare",
  "lmjax.sample",
  "lmjax.evaluate",
  "lmjax.sweep",
  "lmjax.scaling",
  "lmjax.export",  # issue 24 names `python -m lmjax.export` and `python -m lmjax.serve`
  "lmjax.serve",
)


def layer(module: str) -> int | None:
  if module in COMMAND_ALIASES:
    return LAYERS.index("cli")
  parts = module.split(".")
  return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_belongs_to_a_layer():
  assert [m for m in MODULES if m != "lmjax" and layer(m) is None] == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_the_layers_and_stay_at_module_level(name):
  path, tree = MODULES[name]
  top = set(lmjax_imports(tree, top_level_only=True))
  hidden = [
    f"line {line}: {mod}" for line, mod in lmjax_imports(tree, top_level_only=False) if (line, mod) not in top
  ]
  assert not hidden, f"{path}: lmjax imports inside functions (a dodged cycle?): {hidden}"
  if layer(name) is None:
    return
  upward = [
    f"line {line}: {mod} ({LAYERS[layer(mod)]})"
    for line, mod in top
    if layer(mod) is not None and layer(mod) > layer(name)
  ]
  assert not upward, f"{path} ({LAYERS[layer(name)]}) imports upward: {upward}"


def test_no_import_cycle():
  graph = {
    name: {mod for _, mod in lmjax_imports(tree, True) if mod in MODULES and mod != name}
    for name, (_, tree) in MODULES.items()
  }
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in graph[node]:
      if nxt.startswith(node + "."):  # a package importing its own submodules (re-exports) is no cycle
        continue
      if state.get(nxt) == "open":
        cycle = stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt]
        pytest.fail(f"import cycle: {' -> '.join(cycle)}")
      if nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for name in graph:
    if name not in state:
      visit(name, [name])


def test_no_file_over_the_line_limit():
  long = {
    str(p.relative_to(PACKAGE.parent)): n
    for p, _ in MODULES.values()
    if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
  }
  assert long == {}, f"files over {MAX_LINES} lines: {long}"


def test_housekeeping_never_deletes_runs():
  """`make clean` removes the environment and caches only; runs/ goes only with `make clean-runs`."""
  repo = PACKAGE.parent
  clean = subprocess.run(["make", "-n", "clean"], cwd=repo, capture_output=True, text=True, check=True).stdout
  assert ".venv" in clean and "runs" not in clean.split()
  runs = subprocess.run(["make", "-n", "clean-runs"], cwd=repo, capture_output=True, text=True, check=True)
  assert "rm -rf runs" in runs.stdout
