"""Policy files: a mistake fails start-up, naming the file and the key."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.app import build_app
from proxy.config import load_config
from proxy.domain.catalog import load_catalog
from proxy.domain.policyfile import PolicyError
from tests.conftest import JWT_SECRET, POLICIES

T2V = "models.grok-imagine-video-text-to-video"


def test_the_shipped_catalog_is_the_upstream_document(tmp_path: Path) -> None:
    catalog = load_catalog(POLICIES)

    assert list(catalog.models) == [
        "grok-imagine-video-text-to-video", "grok-imagine-video-image-to-video",
        "grok-imagine-video-edit-video", "grok-imagine-video-reference-to-video",
    ]
    prices = {model.id: model.pricing.per_second_micros for model in catalog.models.values()}
    assert prices == {
        "grok-imagine-video-text-to-video": {"480p": 50_000, "720p": 70_000},
        "grok-imagine-video-image-to-video": {"480p": 50_000, "720p": 70_000},
        "grok-imagine-video-edit-video": {"480p": 60_000, "720p": 80_000},
        "grok-imagine-video-reference-to-video": {"480p": 50_000, "720p": 70_000},
    }
    edit = catalog.models["grok-imagine-video-edit-video"].pricing
    assert (edit.seconds_from_video, edit.max_seconds, edit.top_resolution) == ("video_url", 15, "720p")
    reference = catalog.models["grok-imagine-video-reference-to-video"].fields
    assert (reference["duration"].minimum, reference["duration"].maximum, reference["duration"].default) == (3, 15, 8)
    assert (reference["reference_image_urls"].min_items, reference["reference_image_urls"].max_items) == (1, 7)
    assert catalog.models["grok-imagine-video-image-to-video"].fields["aspect_ratio"].values[0] == "auto"
    assert "auto" not in catalog.models["grok-imagine-video-text-to-video"].fields["aspect_ratio"].values


BROKEN = [
    ("typo", "duration = { type = \"integer\", default = 6", "duration = { type = \"integer\", defualt = 6",
     f"{T2V}.fields.duration.defualt: unknown key"),
    ("default out of range", "default = 6, min = 3, max = 10 }\naspect_ratio = { type = \"enum\", default = \"16:9\"",
     "default = 60, min = 3, max = 10 }\naspect_ratio = { type = \"enum\", default = \"16:9\"",
     f"{T2V}.fields.duration.default: must be between 3 and 10"),
    ("float price", '"480p" = "0.05"', '"480p" = 0.05',
     f'{T2V}.pricing.per_second_usd.480p: must be a decimal written as a string, e.g. "0.05"'),
    ("missing price", '"480p" = "0.05"\n"720p" = "0.07"\n\n\n[models.grok-imagine-video-image-to-video]',
     '"480p" = "0.05"\n\n\n[models.grok-imagine-video-image-to-video]',
     f"{T2V}.pricing.per_second_usd.720p: has no price, but the resolution field allows it"),
    ("unknown type", 'prompt = { type = "string", required = true }\nduration = { type = "integer", default = 6, min = 3, max = 10 }\naspect_ratio = { type = "enum", default = "16:9"',
     'prompt = { type = "text", required = true }\nduration = { type = "integer", default = 6, min = 3, max = 10 }\naspect_ratio = { type = "enum", default = "16:9"',
     f"{T2V}.fields.prompt.type: must be one of string, integer, enum, url, url_list"),
    ("sub-micro price", '"480p" = "0.05"', '"480p" = "0.0500001"',
     f"{T2V}.pricing.per_second_usd.480p: is more precise than a micro-dollar"),
]


def _broken_dir(tmp_path: Path, old: str, new: str) -> Path:
    directory = tmp_path / "policies"
    shutil.copytree(POLICIES, directory)
    text = (directory / "models.toml").read_text()
    assert old in text, old
    (directory / "models.toml").write_text(text.replace(old, new, 1))
    return directory


@pytest.mark.parametrize(("case", "old", "new", "where"), BROKEN, ids=[case for case, *_ in BROKEN])
def test_mistakes_name_file_and_key(tmp_path: Path, case: str, old: str, new: str, where: str) -> None:
    directory = _broken_dir(tmp_path, old, new)

    with pytest.raises(PolicyError) as caught:
        load_catalog(directory)

    assert str(caught.value) == f"{directory / 'models.toml'}: {where}"


def test_unparseable_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "models.toml").write_text("[models\n")
    with pytest.raises(PolicyError, match=re.escape(f"{tmp_path / 'models.toml'}: not valid TOML")):
        load_catalog(tmp_path)
    with pytest.raises(PolicyError) as caught:
        load_catalog(tmp_path / "nowhere")
    assert str(caught.value) == f"{tmp_path / 'nowhere' / 'models.toml'}: file not found"


def test_a_bad_policy_fails_app_start_up(tmp_path: Path) -> None:
    directory = _broken_dir(tmp_path, *BROKEN[0][1:3])
    config = load_config({}, upstream_key="k", jwt_secret=JWT_SECRET, policies_dir=directory, db_path=str(tmp_path / "db"))

    with pytest.raises(PolicyError, match="fields.duration.defualt: unknown key"):
        build_app(config)


def test_policies_check_command(tmp_path: Path) -> None:
    good = subprocess.run([sys.executable, "-m", "proxy.cli", "policies", "check", str(POLICIES)],
                          capture_output=True, text=True)
    directory = _broken_dir(tmp_path, *BROKEN[2][1:3])
    bad = subprocess.run([sys.executable, "-m", "proxy.cli", "policies", "check", str(directory)],
                         capture_output=True, text=True)

    assert good.returncode == 0
    assert good.stdout.startswith(f"{POLICIES}: ok (4 models: grok-imagine-video-text-to-video,")
    assert bad.returncode == 2
    assert bad.stderr == f'pixazo-proxy: error: {directory / "models.toml"}: {BROKEN[2][3]}\n'


@pytest.mark.parametrize(("old", "new", "where"), [
    ("interval_seconds = 60", "intervall_seconds = 60", "sweeper.intervall_seconds: unknown key"),
    ('failed = "charge"', 'failed = "maybe"', 'settlement.failed: must be one of "charge", "release"'),
    ('# limit_usd = "5000"', "limit_usd = 5000.5", 'global.limit_usd: must be a decimal written as a string, e.g. "0.05"'),
    ("soft_threshold_percent = 80", "soft_threshold_percent = 180", "teams.soft_threshold_percent: must be at most 100"),
    ("timeout_seconds = 5", "timeout_seconds = 0", "probe.timeout_seconds: must be greater than 0"),
])
def test_budget_policy_mistakes_name_file_and_key(tmp_path: Path, old: str, new: str, where: str) -> None:
    from proxy.domain.budget import load_budget_rules

    directory = tmp_path / "policies"
    shutil.copytree(POLICIES, directory)
    text = (directory / "budgets.toml").read_text()
    assert old in text
    (directory / "budgets.toml").write_text(text.replace(old, new, 1))

    with pytest.raises(PolicyError) as caught:
        load_budget_rules(directory)

    assert str(caught.value) == f"{directory / 'budgets.toml'}: {where}"


@pytest.mark.parametrize(("file", "old", "new", "where"), [
    ("cache.toml", 'scope = "team"', 'scope = "world"', 'dedup.scope: must be one of "team", "global"'),
    ("cache.toml", "keep_copies = false", "keep_copy = false", "media.keep_copy: unknown key"),
    ("webhooks.toml", "retry_schedule_seconds = [5,", 'retry_schedule_seconds = ["5",',
     "delivery.retry_schedule_seconds: must be a list of waits in seconds, each at least 0"),
    ("webhooks.toml", "concurrency = 8", "concurrency = 0", "delivery.concurrency: must be at least 1"),
])
def test_cache_and_webhook_policy_mistakes_name_file_and_key(tmp_path: Path, file: str, old: str, new: str,
                                                            where: str) -> None:
    from proxy.domain.cache import load_cache_rules
    from proxy.jobs.webhooks import load_delivery_rules

    directory = tmp_path / "policies"
    shutil.copytree(POLICIES, directory)
    text = (directory / file).read_text()
    assert old in text
    (directory / file).write_text(text.replace(old, new, 1))
    loader = load_cache_rules if file == "cache.toml" else load_delivery_rules

    with pytest.raises(PolicyError) as caught:
        loader(directory)

    assert str(caught.value) == f"{directory / file}: {where}"
