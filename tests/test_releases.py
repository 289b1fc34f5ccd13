"""Which SGLang release the user means, and what nhcheck answers for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from nhcheck import engines
from nhcheck.engines.base import release_key
from nhcheck.engines.sglang import EPOCHS, NEWEST, PROFILES, parse_engine_id
from nhcheck.errors import UsageError
from nhcheck.pipeline import audit_path

EX = Path(__file__).parent.parent / "examples"


def test_release_order_follows_the_index():
    assert sorted(PROFILES, key=release_key) == list(PROFILES)
    assert release_key("0.5.10rc0") < release_key("0.5.10") < release_key("0.5.10.post1") < release_key("0.5.11")


def test_every_release_on_the_index_has_a_row_and_rows_are_epochs():
    """37 releases ship nemotron_h.py (0.5.3.post1 … 0.5.23 and the 0.5.10rc0 pre-release): 18 epochs B1–B18."""
    assert len(PROFILES) == 37 and next(iter(PROFILES)) == "0.5.3.post1" and "0.5.10rc0" in PROFILES
    assert PROFILES["0.5.12.post1"] is PROFILES["0.5.12"] and PROFILES["0.5.22"] is PROFILES["0.5.21"]
    assert PROFILES["0.5.3.post1"] is PROFILES["0.5.3.post3"] and PROFILES["0.5.10rc0"] is PROFILES["0.5.10.post1"]
    assert len(EPOCHS) == 18 and [p for p in EPOCHS if p.newest] == [PROFILES[NEWEST]]
    for version in PROFILES:
        assert parse_engine_id(f"sglang@{version}") == engines.EngineId("sglang", version)


@pytest.mark.parametrize("version", ["0.4.0", "0.5.2", "0.5.3", "0.5.11.post7"])
def test_unknown_older_releases_are_a_usage_error_listing_the_range(version):
    with pytest.raises(UsageError, match=r"is not a release with Nemotron-H.*sglang 0\.5\.3\.post1 … 0\.5\.23"):
        parse_engine_id(f"sglang@{version}")


def test_not_a_version_is_a_usage_error():
    with pytest.raises(UsageError, match="is not a release version"):
        parse_engine_id("sglang@newest-please")


def test_a_newer_release_is_answered_as_the_newest_and_says_so():
    eid = parse_engine_id("sglang@0.6.0")
    assert eid.version == "0.6.0" and eid.assumption and "answered with 0.5.23" in eid.assumption
    newer = audit_path(str(EX / "nano3-bf16"), "sglang@0.6.0")
    newest = audit_path(str(EX / "nano3-bf16"), f"sglang@{NEWEST}")
    assert [r.outcome for r in newer.records] == [r.outcome for r in newest.records]
    assert [f for f in newer.findings if f.code == "engine-assumed"][0].severity == "info"
    assert not [f for f in newest.findings if f.code == "engine-assumed"]


def test_bare_engine_means_the_installed_release(tmp_path, monkeypatch):
    assert parse_engine_id("sglang") == engines.EngineId("sglang", NEWEST)  # no sglang here
    dist = tmp_path / "sglang-0.5.18.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sglang\nVersion: 0.5.18\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eid = parse_engine_id(None)
    assert (eid.version, eid.installed) == ("0.5.18", True)
    assert "(installed)" in eid.described
    assert parse_engine_id("sglang@0.5.23").installed is False


def test_cli_default_engine_is_the_installed_release(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from nhcheck.cli import cli

    dist = tmp_path / "sglang-0.5.18.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sglang\nVersion: 0.5.18\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = CliRunner().invoke(cli, ["audit", str(EX / "nano3-bf16"), "-f", "json", "-q"])
    engine = json.loads(r.output)["engine"]
    assert (engine["version"], engine["installed"]) == ("0.5.18", True)


@pytest.mark.parametrize(
    "entry", ["sglang-0.5.18.dist-info", "SGLang-0.5.18.dist-info", "sglang.egg-info", "SGLANG-0.5.18-py3.11.egg-info"]
)
def test_installed_version_finds_what_importlib_metadata_finds(tmp_path, monkeypatch, entry):
    """The sys.path pre-scan that spares importing importlib.metadata never answers None where it would not."""
    from importlib import metadata

    from nhcheck.engines.base import installed_version

    for dist in metadata.distributions():  # every distribution of this environment, as importlib spells it
        name = dist.metadata["Name"]
        assert installed_version(name) == metadata.version(name), name
    assert installed_version("sglang") is None
    info = tmp_path / entry
    info.mkdir()
    (info / ("PKG-INFO" if entry.endswith("egg-info") else "METADATA")).write_text(
        "Metadata-Version: 2.1\nName: sglang\nVersion: 0.5.18\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert installed_version("sglang") == metadata.version("sglang") == "0.5.18"
