#!/usr/bin/env python3
"""Validate the dreamloop scenario template library (scenarios/<domain>/*.toml).

Checks every rule of the template schema that the Rust parser relies on, then prints
counts per kind/split/domain and the number of distinct slot combinations.

Rules checked, per template:
  * keys: id, kind, split, domain, user, preferred, rejected required; system, turns,
    slots optional; nothing else.
  * id unique across the library and prefixed with "<domain>."; domain equals the
    folder name; kind in {clear_direction, flawed_direction, general}; split in
    {train, probe}.
  * turns: list of {role = "user" | "assistant", content = string}.
  * placeholders: no "{{{" / "}}}"; every "{{" / "}}" is part of a {{name}} placeholder, every name is a
    defined slot, every slot is used (directly or via another slot), no cycles.
  * slots: each a non-empty list of distinct non-empty strings.
  * direction span: "[[" and "]]" occur exactly once each, in `user` only, in that
    order, with a non-empty span between them (clear_direction / flawed_direction);
    general templates may have zero or one span. Nowhere else, not in slot values.
  * expansion: a deterministic sample of expansions (every slot value is hit at least
    once) is fully substituted and introduces no stray "[[", "]]", "{{", "}}".
  * preferred and rejected differ, and are at most 6 sentences outside code blocks
    (warning only).

Library-wide minimums (from issue 4): >= 36 train templates of each direction kind,
>= 8 probe templates of each direction kind, >= 300,000 slot combinations summed over
train templates.

Usage: python3 scripts/check-scenarios.py [scenarios_dir]
Exit status 0 when clean, 1 when any error was found.
"""

import math
import random
import re
import sys
import tomllib
from collections import Counter
from pathlib import Path

KINDS = {"clear_direction", "flawed_direction", "general"}
SPLITS = {"train", "probe"}
DOMAINS = {"code", "shell", "data", "writing", "planning", "general"}
REQUIRED = {"id", "kind", "split", "domain", "user", "preferred", "rejected"}
OPTIONAL = {"system", "turns", "slots"}
PLACEHOLDER = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}")
MIN_TRAIN_PER_KIND = 36
MIN_PROBE_PER_KIND = 8
MIN_TRAIN_COMBINATIONS = 300_000
SAMPLES_PER_TEMPLATE = 64


def occurrences(text, needle):
    """Start indices of every (overlapping) occurrence of needle in text."""
    out = []
    i = text.find(needle)
    while i != -1:
        out.append(i)
        i = text.find(needle, i + 1)
    return out


def stray_braces(text):
    """'{{' or '}}' sequences that are not part of a well-formed placeholder."""
    stripped = PLACEHOLDER.sub("", text)
    triple = occurrences(text, "{{{") + occurrences(text, "}}}")
    return occurrences(stripped, "{{") + occurrences(stripped, "}}") + triple


def expand(text, values, depth=0):
    """Substitute placeholders recursively using the chosen value per slot."""
    if depth > 16:
        raise ValueError("expansion too deep")

    def sub(m):
        return expand(values[m.group(1)], values, depth + 1)

    return PLACEHOLDER.sub(sub, text)


def sentence_count(text):
    """Rough sentence count of prose, ignoring fenced code blocks and list items."""
    prose = re.sub(r"```.*?```", " ", text, flags=re.S)
    prose = re.sub(r"(?m)^\s*(?:[-*]|\d+\.)\s.*$", " ", prose)
    return len(re.findall(r"[.!?](?:\s|$)", prose))


class Checker:
    def __init__(self, root):
        self.root = root
        self.errors = []
        self.warnings = []
        self.ids = {}
        self.templates = []

    def err(self, where, msg):
        self.errors.append(f"{where}: {msg}")

    def warn(self, where, msg):
        self.warnings.append(f"{where}: {msg}")

    def run(self):
        files = sorted(p for p in self.root.glob("*/*.toml"))
        if not files:
            self.err(str(self.root), "no scenarios/<domain>/*.toml files found")
        for path in files:
            self.check_file(path)
        return self.report()

    def check_file(self, path):
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            self.err(str(path), f"does not parse: {e}")
            return
        unknown_top = set(doc) - {"template"}
        if unknown_top:
            self.err(str(path), f"unknown top-level keys {sorted(unknown_top)}")
        templates = doc.get("template", [])
        if not isinstance(templates, list) or not templates:
            self.err(str(path), "no [[template]] tables")
            return
        for i, t in enumerate(templates):
            self.check_template(path, i, t)

    def check_template(self, path, index, t):
        where = f"{path}#template[{index}]"
        if not isinstance(t, dict):
            self.err(where, "template is not a table")
            return
        tid = t.get("id")
        if isinstance(tid, str):
            where = f"{path}:{tid}"
        missing = REQUIRED - set(t)
        if missing:
            self.err(where, f"missing keys {sorted(missing)}")
            return
        unknown = set(t) - REQUIRED - OPTIONAL
        if unknown:
            self.err(where, f"unknown keys {sorted(unknown)}")
        for key in REQUIRED | {"system"}:
            if key in t and (not isinstance(t[key], str) or not t[key].strip()):
                self.err(where, f"`{key}` must be a non-empty string")
                return
        if tid in self.ids:
            self.err(where, f"duplicate id (first in {self.ids[tid]})")
        self.ids[tid] = str(path)
        domain_dir = path.parent.name
        if t["domain"] != domain_dir:
            self.err(where, f"domain {t['domain']!r} but file is in {domain_dir}/")
        if t["domain"] not in DOMAINS:
            self.err(where, f"unknown domain {t['domain']!r}")
        if not tid.startswith(t["domain"] + "."):
            self.err(where, f"id should start with '{t['domain']}.'")
        if t["kind"] not in KINDS:
            self.err(where, f"unknown kind {t['kind']!r}")
        if t["split"] not in SPLITS:
            self.err(where, f"unknown split {t['split']!r}")

        # texts[name] = string that may hold placeholders; slot values added below.
        texts = {}
        if "system" in t:
            texts["system"] = t["system"]
        turns = t.get("turns", [])
        if not isinstance(turns, list):
            self.err(where, "`turns` must be an array")
            turns = []
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
                self.err(where, f"turns[{j}] must be {{ role, content }}")
                continue
            if turn["role"] not in ("user", "assistant"):
                self.err(where, f"turns[{j}].role {turn['role']!r} not user/assistant")
            if not isinstance(turn["content"], str) or not turn["content"].strip():
                self.err(where, f"turns[{j}].content must be a non-empty string")
                continue
            texts[f"turns[{j}]"] = turn["content"]
        for key in ("user", "preferred", "rejected"):
            texts[key] = t[key]

        slots = t.get("slots", {})
        if not isinstance(slots, dict):
            self.err(where, "`slots` must be a table")
            slots = {}
        for name, vals in slots.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                self.err(where, f"slot name {name!r} is not an identifier")
            if not isinstance(vals, list) or not vals:
                self.err(where, f"slot {name!r} must be a non-empty array of strings")
                continue
            if any(not isinstance(v, str) or not v.strip() for v in vals):
                self.err(where, f"slot {name!r} has an empty or non-string value")
                continue
            dup = [v for v, c in Counter(vals).items() if c > 1]
            if dup:
                self.err(where, f"slot {name!r} has duplicate values {dup[:2]}")
            for k, v in enumerate(vals):
                texts[f"slots.{name}[{k}]"] = v

        # Direction markers and stray braces, in raw text.
        for key, text in texts.items():
            opens, closes = occurrences(text, "[["), occurrences(text, "]]")
            if key == "user":
                continue
            if opens or closes:
                self.err(where, f"`[[`/`]]` in {key} (only allowed once, in user)")
            if stray_braces(text):
                self.err(where, f"stray '{{{{' or '}}}}' in {key}")
        user = t["user"]
        opens, closes = occurrences(user, "[["), occurrences(user, "]]")
        if stray_braces(user):
            self.err(where, "stray '{{' or '}}' in user")
        if t["kind"] in ("clear_direction", "flawed_direction"):
            if len(opens) != 1 or len(closes) != 1:
                self.err(where, f"user must hold exactly one [[...]] span "
                         f"(found {len(opens)} '[[' and {len(closes)} ']]')")
            elif not opens[0] + 2 < closes[0]:
                self.err(where, "direction span empty or ']]' before '[['")
        elif len(opens) > 1 or len(closes) > 1 or len(opens) != len(closes):
            self.err(where, "general template has a malformed direction span")

        # Placeholder graph: undefined names, unused slots, cycles.
        refs = {}
        for key, text in texts.items():
            for name in PLACEHOLDER.findall(text):
                if name not in slots:
                    self.err(where, f"{{{{{name}}}}} used in {key} but not defined")
        for name, vals in slots.items():
            if isinstance(vals, list):
                refs[name] = {n for v in vals if isinstance(v, str)
                              for n in PLACEHOLDER.findall(v)}
        used = set()
        frontier = {n for key, text in texts.items() if not key.startswith("slots.")
                    for n in PLACEHOLDER.findall(text)}
        while frontier:
            name = frontier.pop()
            if name in used or name not in refs:
                continue
            used.add(name)
            frontier |= refs[name]
        for name in slots:
            if name not in used:
                self.err(where, f"slot {name!r} is never used")
        cycle = self.find_cycle(refs)
        if cycle:
            self.err(where, f"slot cycle {' -> '.join(cycle)}")
            return
        if any(e.startswith(where) for e in self.errors):
            return

        self.check_expansions(where, t, slots)
        for key in ("preferred", "rejected"):
            n = sentence_count(t[key])
            if n > 7:
                self.warn(where, f"{key} has ~{n} sentences (aim for 1-6)")
        combos = math.prod(len(v) for v in slots.values()) if slots else 1
        self.templates.append((t, combos))

    @staticmethod
    def find_cycle(refs):
        state = {}

        def visit(n, stack):
            state[n] = 1
            for m in refs.get(n, ()):
                if state.get(m) == 1:
                    return stack + [n, m]
                if m not in state:
                    c = visit(m, stack + [n])
                    if c:
                        return c
            state[n] = 2
            return None

        for n in refs:
            if n not in state:
                c = visit(n, [])
                if c:
                    return c
        return None

    def check_expansions(self, where, t, slots):
        rng = random.Random(t["id"])
        names = list(slots)
        width = max((len(v) for v in slots.values()), default=1)
        picks = []
        for k in range(width):  # every value of every slot at least once
            picks.append({n: slots[n][k % len(slots[n])] for n in names})
        for _ in range(SAMPLES_PER_TEMPLATE):
            picks.append({n: rng.choice(slots[n]) for n in names})
        fields = [t.get("system", "")] + [x["content"] for x in t.get("turns", [])]
        fields += [t["user"], t["preferred"], t["rejected"]]
        for values in picks:
            out = [expand(f, values) for f in fields]
            user = out[-3]
            for text in out:
                if "{{" in text or "}}" in text:
                    self.err(where, f"expansion leaves braces: {text[:80]!r}")
                    return
            for text in out[:-3] + out[-2:]:
                if "[[" in text or "]]" in text:
                    self.err(where, f"expansion creates '[['/']]': {text[:80]!r}")
                    return
            if user.count("[[") > 1 or user.count("]]") > 1:
                self.err(where, f"expansion adds a second span marker: {user[:80]!r}")
                return
            if out[-2].strip() == out[-1].strip():
                self.err(where, "preferred and rejected expand to the same text")
                return

    def report(self):
        by = Counter()
        combos_by = Counter()
        for t, combos in self.templates:
            by[(t["kind"], t["split"], t["domain"])] += 1
            combos_by[(t["kind"], t["split"])] += combos
        print("templates per kind / split / domain:")
        domains = sorted({k[2] for k in by})
        print(f"  {'kind':18} {'split':6} " + " ".join(f"{d:>8}" for d in domains)
              + f" {'total':>7} {'combos':>12}")
        for kind in sorted(KINDS):
            for split in sorted(SPLITS):
                row = [by[(kind, split, d)] for d in domains]
                if sum(row):
                    print(f"  {kind:18} {split:6} " + " ".join(f"{n:8}" for n in row)
                          + f" {sum(row):7} {combos_by[(kind, split)]:12,}")
        train_combos = sum(c for t, c in self.templates if t["split"] == "train")
        smallest = sorted((c, t["id"]) for t, c in self.templates if t["split"] == "train")[:3]
        print(f"templates: {len(self.templates)} valid, ids: {len(self.ids)}")
        print(f"distinct slot combinations over train templates: {train_combos:,}")
        print(f"smallest train templates: {smallest}")

        def total(kind, split):
            return sum(by[(kind, split, d)] for d in domains)

        for kind in ("clear_direction", "flawed_direction"):
            if total(kind, "train") < MIN_TRAIN_PER_KIND:
                self.err("library", f"{kind}/train: {total(kind, 'train')} < {MIN_TRAIN_PER_KIND}")
            if total(kind, "probe") < MIN_PROBE_PER_KIND:
                self.err("library", f"{kind}/probe: {total(kind, 'probe')} < {MIN_PROBE_PER_KIND}")
        if train_combos < MIN_TRAIN_COMBINATIONS:
            self.err("library", f"train combinations {train_combos:,} < {MIN_TRAIN_COMBINATIONS:,}")
        for w in self.warnings:
            print("warning:", w)
        for e in self.errors:
            print("error:", e)
        print("OK" if not self.errors else f"{len(self.errors)} error(s)")
        return 0 if not self.errors else 1


def main():
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "scenarios"
    sys.exit(Checker(root).run())


if __name__ == "__main__":
    main()
