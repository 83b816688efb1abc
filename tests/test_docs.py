"""The guide's config tables: every key the config takes, each with the default the code has."""

import re

import yaml
from beamsift.pipeline import config
from conftest import ROOT

# A row of a config table: | `section.key`, `other`, ... | `default`, `default`, ... | meaning |
# (or a top-level key: | `seed` | ...)
ROW = re.compile(r"^\| (`[a-z_]+(?:\.[a-z_<>]+)?`[^|]*)\| ([^|]*)\|")


def _documented(text: str) -> dict:
    """{dotted key: the default its row gives (None where the row gives none per key)}."""
    rows = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if not m:
            continue
        names = re.findall(r"`([a-z_.<>]+)`", m.group(1))
        if "." in names[0]:  # `proxy.vocab_size`, `layers`: the section's keys
            section = names[0].split(".")[0]
            keys = [n if "." in n else f"{section}.{n}" for n in names]
        elif isinstance(config.SCHEMA.get(names[0], {}), dict):
            continue  # a table of something else (stages, columns, the manifest)
        else:  # `seed`: top-level keys
            keys = names
        values = re.findall(r"`([^`]*)`", m.group(2))
        for i, key in enumerate(keys):  # the config's table comes first: the manifest's rows name keys too
            rows.setdefault(key, values[i] if len(values) == len(keys) else None)
    return rows


def _same(documented: str, default) -> bool:
    try:
        value = yaml.safe_load(documented)
    except yaml.YAMLError:
        value = documented
    if isinstance(default, float) and isinstance(value, str):
        try:  # 1e-4: a float to Python, a string to YAML 1.1 (which wants 1.0e-4)
            value = float(value)
        except ValueError:
            pass
    return value == default or str(value) == str(default)


def test_the_guide_names_every_config_key_with_the_codes_default():
    documented = _documented((ROOT / "docs" / "guide.md").read_text())
    defaults = {key: config._get(config.SCHEMA, key)[0] for key in config._all_keys()}
    assert not sorted(set(defaults) - set(documented)), "config keys without a row in docs/guide.md"
    wrong = {
        key: (documented[key], default)
        for key, default in defaults.items()
        if documented.get(key) is not None and default is not config.REQUIRED and not _same(documented[key], default)
    }
    assert not wrong, f"the guide's default differs from the code's: {wrong}"
    # The rows compared are most of them, not a few
    assert sum(documented.get(k) is not None for k in defaults) > len(defaults) * 0.7
