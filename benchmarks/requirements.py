"""benchmarks/requirements.py — what each task's own code needs on this machine, checked before anything runs.

A task's scorer runs only at the very end of its evaluation (lmms-eval aggregates after every doc is answered), so
a missing Java or a missing optional package would otherwise surface after the GPU hours are spent. For every task
folder that will run (its YAML's folder: lmms-eval's own, an include_path, or a prepared copy), this reads the
task's Python files (``ast``; nothing is imported or executed) and reports, one line per task, what is missing and
what to install:

* **modules** the task code imports (``import x`` / ``from x import y``; imports guarded by ``try: … except
  ImportError`` are optional and skipped). A module-level import is needed as soon as lmms-eval loads the task
  (``vilex eval prepare`` too: stage ``import``); one inside a function only when it is called (stage ``run``).
* **Java**, when the code calls pycocoevalcap's ``PTBTokenizer`` (the COCO captioning scorers tokenise with Stanford
  CoreNLP's PTB tokenizer), ``Meteor`` (``java -jar -Xmx2G meteor-1.5.jar``: the JVM must start with a 2 GB heap)
  or ``Spice``.
* **pycocoevalcap's resources** for those scorers: the CoreNLP jar, ``meteor-1.5.jar`` and its
  ``data/paraphrase-en.gz``, SPICE's jar and the CoreNLP models it otherwise downloads on first use; and a
  WRITABLE ``pycocoevalcap/tokenizer`` folder (``PTBTokenizer`` writes its temporary file beside its jar, so a
  read-only site-packages fails at scoring time).
"""
from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Literal

JAVA_FIX = "install a Java runtime (e.g. `apt-get install default-jre-headless`, or `conda install openjdk`)"
# import name -> pip distribution, for the names that differ
PIP_NAMES = {"cv2": "opencv-python-headless", "PIL": "pillow", "sklearn": "scikit-learn", "skimage": "scikit-image",
             "yaml": "pyyaml", "Levenshtein": "levenshtein", "bs4": "beautifulsoup4", "Crypto": "pycryptodome",
             "google.genai": "google-genai", "dateutil": "python-dateutil", "sentence_transformers":
             "sentence-transformers", "zhon": "zhon", "jieba": "jieba", "editdistance": "editdistance"}
SCORERS = ("PTBTokenizer", "Meteor", "Spice")


@dataclass(frozen=True)
class Missing:
    """One unmet requirement of one task."""

    task: str
    what: str  # e.g. "Java runtime"
    why: str  # who needs it
    fix: str  # what to do
    stage: Literal["import", "run"]  # import: loading the task fails (prepare too); run: scoring fails

    def text(self) -> str:
        return f"{self.what} ({self.why}): {self.fix}"


def format_missing(missing: Iterable[Missing]) -> list[str]:
    """One line per task: ``task T: missing A (why): fix; missing B …``."""
    by_task: dict[str, list[Missing]] = {}
    for m in missing:
        by_task.setdefault(m.task, []).append(m)
    return [f"task {t}: missing " + "; missing ".join(m.text() for m in ms) for t, ms in by_task.items()]


# ---------------------------------------------------------------- the machine
@lru_cache(maxsize=None)
def java_problem(heap: str = "2G") -> str | None:
    """Why ``java`` cannot run here with a ``heap`` maximum heap (None when it can)."""
    java = shutil.which("java")
    if java is None:
        return "`java` is not on PATH"
    try:
        proc = subprocess.run([java, f"-Xmx{heap}", "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`{java} -version` failed: {e}"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"`{java} -Xmx{heap} -version` exits {proc.returncode}: {tail[0]}"
    return None


def pycocoevalcap_dir() -> Path | None:
    """The installed pycocoevalcap folder (a namespace package: located through a submodule's spec)."""
    try:
        spec = importlib.util.find_spec("pycocoevalcap.tokenizer.ptbtokenizer")
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).parents[1] if spec is not None and spec.origin else None


def _scorer_resources(scorer: str, root: Path) -> list[tuple[str, str]]:
    """(what is missing, fix) for one pycocoevalcap scorer's files."""
    out = []
    reinstall = "reinstall it: pip install --force-reinstall pycocoevalcap"
    if scorer == "PTBTokenizer":
        if not (root / "tokenizer" / "stanford-corenlp-3.4.1.jar").is_file():
            out.append(("pycocoevalcap/tokenizer/stanford-corenlp-3.4.1.jar", reinstall))
        if not os.access(root / "tokenizer", os.W_OK):
            out.append((f"write access to {root / 'tokenizer'} (PTBTokenizer writes its temporary file there)",
                        "install pycocoevalcap somewhere writable (a virtualenv you own)"))
    elif scorer == "Meteor":
        for rel in ("meteor/meteor-1.5.jar", "meteor/data/paraphrase-en.gz"):
            if not (root / rel).is_file():
                out.append((f"pycocoevalcap/{rel}", reinstall))
    elif scorer == "Spice":
        if not (root / "spice" / "spice-1.0.jar").is_file():
            out.append(("pycocoevalcap/spice/spice-1.0.jar", reinstall))
        if not list((root / "spice" / "lib").glob("stanford-corenlp-3.6.0*.jar")):
            out.append(("pycocoevalcap/spice/lib/stanford-corenlp-3.6.0 jars (SPICE downloads them on first use)",
                        "run SPICE once where the network is reachable (pycocoevalcap.spice.get_stanford_models)"))
    return out


# ---------------------------------------------------------------- the code
def _optional_import_lines(tree: ast.AST) -> set[int]:
    """Line numbers of imports inside ``try:`` blocks that catch ImportError (or everything)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        names = []
        for h in node.handlers:
            if h.type is None:
                names.append("Exception")
            else:
                for t in (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]):
                    names.append(getattr(t, "id", getattr(t, "attr", "")))
        if any(n in ("ImportError", "ModuleNotFoundError", "Exception", "BaseException") for n in names):
            lines |= {n.lineno for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import,
                                                                                               ast.ImportFrom))}
    return lines


def code_needs(source: str) -> tuple[dict[str, str], set[str]]:
    """(module -> stage it is needed at, pycocoevalcap scorers called) for one Python file."""
    tree = ast.parse(source)
    optional = _optional_import_lines(tree)
    top_level = {id(n) for n in tree.body}
    top_level |= {id(n) for stmt in tree.body if isinstance(stmt, (ast.If, ast.Try))
                  for n in ast.walk(stmt)}  # `if TYPE_CHECKING` / try at module level run at import too
    modules: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno not in optional:
            if isinstance(node, ast.ImportFrom) and (node.level or not node.module):
                continue  # relative imports: files of the task folder itself
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            stage = "import" if id(node) in top_level else "run"
            for name in names:
                if modules.get(name) != "import":
                    modules[name] = stage
    scorers = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in SCORERS:
                scorers.add(name)
    return modules, scorers


def module_available(dotted: str) -> bool:
    """Whether module ``dotted`` can be imported, found WITHOUT importing anything: submodules are looked up as
    files under the top-level package's search path, so checking ``lmms_eval.tasks.x`` costs no lmms-eval import."""
    parts = dotted.split(".")
    if parts[0] in sys.stdlib_module_names or parts[0] in sys.builtin_module_names:
        return True
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    locations = list(spec.submodule_search_locations or [])
    for part in parts[1:]:
        found = None
        for loc in locations:
            base = Path(loc) / part
            if base.is_dir():  # a package or a namespace package
                found = [str(base)]
                break
            if base.with_suffix(".py").is_file() or any(Path(loc).glob(f"{part}.*.so")):
                found = []  # a module file: nothing can be below it
                break
        if found is None:
            return False
        locations = found
    return True


def _pip_name(module: str) -> str:
    for name in (module, module.split(".")[0]):
        if name in PIP_NAMES:
            return PIP_NAMES[name]
    return module.split(".")[0].replace("_", "-")


def _module_file(name: str, folder: Path) -> Path | None:
    """The file of module ``name`` as lmms-eval's ``!function`` resolves it: relative to the YAML's folder first,
    then as an absolute module (located without importing it)."""
    rel = folder.joinpath(*name.split(".")).with_suffix(".py")
    if rel.is_file():
        return rel
    if "." not in name:  # a bare name not in the folder: lmms-eval fails to load the task and names it
        return None
    try:
        spec = importlib.util.find_spec(name.split(".")[0])
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        f = Path(loc).joinpath(*name.split(".")[1:]).with_suffix(".py")
        if f.is_file():
            return f
    return None


def task_code_files(yaml_path: str | Path) -> list[Path]:
    """The Python files a task runs: the modules its ``!function`` values name, and the task-folder modules those
    import in turn (``from utils import …``). Other files of the folder (another task's scorer) are not counted."""
    from benchmarks.prepare import _functions, flatten_task_yaml

    yaml_path = Path(yaml_path)
    folder = yaml_path.parent
    try:
        config, _ = flatten_task_yaml(yaml_path)
    except Exception:  # noqa: BLE001 — an unreadable YAML is reported by lmms-eval, naming it
        return []
    todo = [f for f in (_module_file(".".join(fn.split(".")[:-1]), folder) for fn in _functions(config)) if f]
    seen: list[Path] = []
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.append(f)
        try:
            tree = ast.parse(f.read_text())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                sibling = f.parent / f"{name.split('.')[0]}.py"
                if sibling.is_file() and sibling not in seen:
                    todo.append(sibling)
    return sorted(seen)


def task_missing(task: str, yaml_path: str | Path) -> list[Missing]:
    """Everything task ``task`` (defined by ``yaml_path``) needs and this machine lacks."""
    yaml_path = Path(yaml_path)
    files = task_code_files(yaml_path)
    local = {p.stem for f in files for p in f.parent.glob("*.py")}
    modules: dict[str, str] = {}
    scorers: set[str] = set()
    for f in files:
        try:
            mods, sc = code_needs(f.read_text())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # lmms-eval itself reports a file it cannot load, naming it
        for m, stage in mods.items():
            if modules.get(m) != "import":
                modules[m] = stage
        scorers |= sc
    out: list[Missing] = []
    for m, stage in sorted(modules.items()):
        if m.split(".")[0] in local or module_available(m):
            continue
        where = "when lmms-eval loads the task" if stage == "import" else "when the task scores"
        out.append(Missing(task, f"Python module {m!r}", f"the task code imports it {where}",
                           f"pip install {_pip_name(m)}", stage))
    if scorers:
        who = ", ".join(f"pycocoevalcap {s}" for s in sorted(scorers))
        problem = java_problem("2G" if "Meteor" in scorers else "64m")
        if problem is not None:
            out.append(Missing(task, "Java runtime", f"{who} start `java`; {problem}", JAVA_FIX, "run"))
        root = pycocoevalcap_dir()
        if root is not None:
            for scorer in sorted(scorers):
                for what, fix in _scorer_resources(scorer, root):
                    out.append(Missing(task, what, f"pycocoevalcap {scorer}", fix, "run"))
    return out


def check_tasks(tasks: dict[str, str | Path]) -> list[Missing]:
    """Unmet requirements of every task (task -> its YAML), in task order."""
    return [m for name, path in tasks.items() for m in task_missing(name, path)]
