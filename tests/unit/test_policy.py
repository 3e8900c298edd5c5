"""Policies: validation with file/field/reason errors, and the shipped default policy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from moderation.config import _default_policies_dir
from moderation.matching.policy import PolicyError, load_policy, parse_policy

VALID = {
    "name": "strict",
    "categories": {
        "default": {"block_cosine": 0.8, "review_cosine": 0.6},
        "csam": {
            "banks": ["ncmec"],
            "block_cosine": 0.7,
            "review_cosine": 0.55,
            "unscannable": "block",
            "review_priority": 90,
        },
    },
}


def write(tmp_path: Path, name: str, document: object) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_default_policy_loads_and_documents_every_field() -> None:
    policies = _default_policies_dir()
    policy = load_policy(policies, "default")
    assert policy.name == "default"
    comments = [
        line for line in (policies / "default.yaml").read_text().splitlines() if "#" in line
    ]
    models = [
        type(policy),
        type(policy.candidates),
        type(policy.allow),
        type(policy.rules_for("default")),
        type(policy.rules_for("default").classifier_band),
    ]
    # Every field of every section is explained by a comment in the shipped file.
    for model in models:
        for field in model.model_fields:
            assert any(re.search(rf"\b{field}\b", line) for line in comments), (
                f"{field} is not documented in default.yaml"
            )


def test_valid_policy_round_trip(tmp_path: Path) -> None:
    write(tmp_path, "strict", VALID)
    policy = load_policy(tmp_path, "strict")
    assert policy.rules_for("csam").applies_to("ncmec")
    assert not policy.rules_for("csam").applies_to("other")
    assert policy.rules_for("unknown-category") is policy.rules_for("default")
    # The strictest category decides what unscannable becomes, and the highest priority.
    assert policy.unscannable_decision == "block"
    assert policy.unscannable_priority == 90


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [
        (lambda d: d["categories"]["default"].update(block_cosine=1.5), "block_cosine", "less"),
        (lambda d: d["categories"]["default"].update(action="delete"), "action", "block"),
        (lambda d: d["categories"]["default"].pop("review_cosine"), "review_cosine", "required"),
        (
            lambda d: d["categories"]["default"].update(review_cosine=0.9),
            "default",
            "review_cosine",
        ),
        (lambda d: d.update(colour="red"), "colour", "Extra"),
        (lambda d: d["categories"].pop("default"), "(top level)", "default_category"),
        (lambda d: d["categories"]["csam"].update(unscannable="allow"), "unscannable", "review"),
        # The safety floor: the classifier may never take a block-threshold match to allow.
        (
            lambda d: d["categories"]["default"].update(classifier_band={"max_lower": 2}),
            "classifier_band.max_lower",
            "less than or equal to 1",
        ),
    ],
)
def test_bad_policy_names_file_field_and_reason(
    tmp_path: Path, mutate: object, field: str, reason: str
) -> None:
    import copy

    document = copy.deepcopy(VALID)
    mutate(document)  # type: ignore[operator]
    path = write(tmp_path, "strict", document)
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path, "strict")
    message = str(info.value)
    assert str(path) in message
    assert field in message
    assert reason in message


def test_missing_file_lists_available(tmp_path: Path) -> None:
    write(tmp_path, "strict", VALID)
    with pytest.raises(PolicyError, match=r"no such policy file.*strict"):
        load_policy(tmp_path, "lenient")


def test_name_must_match_file(tmp_path: Path) -> None:
    write(tmp_path, "other", VALID)
    with pytest.raises(PolicyError, match="must equal the file name"):
        load_policy(tmp_path, "other")


def test_not_yaml_and_not_mapping(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("name: [unclosed")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(tmp_path, "broken")
    with pytest.raises(PolicyError, match="must be a mapping"):
        parse_policy(["a"], source="inline")


def test_review_threshold_below_candidate_floor_is_refused() -> None:
    document = {
        "name": "x",
        "candidates": {"min_cosine": 0.7},
        "categories": {"default": {"block_cosine": 0.9, "review_cosine": 0.6}},
    }
    with pytest.raises(PolicyError, match="never retrieved"):
        parse_policy(document, source="inline")
