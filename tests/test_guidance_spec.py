"""fewstep.guidance.spec: the text form of guidance ('apg:scale=3,eta=0') and its table of methods."""

from __future__ import annotations

import inspect

import pytest

from fewstep.guidance import APG, CFG, AdaptiveGuidance, CFGPlusPlus, GuidanceRescale
from fewstep.guidance.spec import GUIDANCE_METHODS, describe_guidance, guidance_names, parse_guidance


def test_every_method_table_agrees_with_its_class_signature():
    """The parameters are listed without importing the classes; this checks the copy mechanically:
    same names as the class's scalar keywords, same defaults (except a spec default the entry
    declares, or a class default of None that the class resolves itself)."""
    for method in GUIDANCE_METHODS.values():
        cls = method.guidance_class()
        if cls is None:
            assert method.name == "none" and not method.params
            continue
        sig = inspect.signature(cls.__init__).parameters
        scalar = [n for n, p in sig.items() if n not in ("self", "guidance")
                  and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert [p.name for p in method.params] == scalar, method.name
        for p in method.params:
            class_default = sig[p.name].default
            if p.name in method.spec_defaults:
                assert p.default == method.spec_defaults[p.name]
            elif class_default is not None:
                assert p.default == class_default, (method.name, p.name)
        # the example setting parses and builds
        assert type(parse_guidance(f"{method.name}:{method.example}").build()) is cls


def test_parse_builds_fresh_objects_with_the_given_values():
    g = parse_guidance("apg:3,momentum=-0.5,space=eps")
    assert g.params == {"scale": 3.0, "momentum": -0.5, "space": "eps"}
    assert g.text == "apg:scale=3.0,momentum=-0.5,space=eps"
    a, b = g.build(), g.build()
    assert isinstance(a, APG) and a is not b and (a.scale, a.momentum, a.space) == (3.0, -0.5, "eps")
    assert parse_guidance("cfg").params == {"scale": 2.0}  # the spec default, not CFG's 7.5
    assert isinstance(parse_guidance("cfg++:0.4").build(), CFGPlusPlus)  # alias
    ag = parse_guidance("adaptive:scale=2,per_sample=false,min_step=3").build()
    assert isinstance(ag, AdaptiveGuidance) and ag.per_sample is False and ag.min_step == 3
    assert isinstance(ag.inner, CFG) and ag.inner.scale == 2.0
    rs = parse_guidance("rescale:0.5,scale=4").build()
    assert isinstance(rs, GuidanceRescale) and rs.phi == 0.5 and rs.inner.scale == 4.0
    assert parse_guidance("").method == parse_guidance("off").method == "none"
    assert parse_guidance("none").build() is None


@pytest.mark.parametrize("spec, message", [
    ("zzz:1", "unknown method 'zzz'; allowed: none, cfg, apg"),
    ("apg:foo=1", "parameter 'foo' is not accepted by apg; allowed: scale, eta"),
    ("apg:3,4", "'4' must be key=value"),
    ("apg:scale=abc", "scale must be a finite number"),
    ("apg:scale=inf", "scale must be a finite number"),
    ("ag:per_sample=2", "per_sample must be true or false"),
    ("ag:min_step=1.5", "min_step must be an integer"),
    ("apg:space=pixels", "space must be one of x0, eps, v, output"),
    ("rescale:phi=0.7", "rescale needs scale"),
    ("none:2", "must be key=value"),
    ("cfg:-1", "cfg scale must be >= 0"),
    ("apg:momentum=5", "momentum must be <= 1.0"),  # the class's range, checked by building once
])
def test_bad_specs_name_the_part_and_what_is_allowed(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_guidance(spec, name="--guidance")
    assert str(err.value).startswith("--guidance '" + spec.split(":")[0])  # names the argument and the spec


def test_ranges_wait_for_build_when_validation_is_off():
    """The CLI parses before it imports torch: names, keys and types fail at once, ranges at build()."""
    g = parse_guidance("apg:momentum=5", validate=False)
    with pytest.raises(ValueError, match="momentum must be <= 1.0"):
        g.build()


def test_listing_shows_descriptions_and_the_defaults_that_run():
    text = describe_guidance()
    for name in guidance_names():
        assert any(line.startswith(name + " ") for line in text.splitlines()), name
    assert "scale=2.0" in text.split("apg")[0]  # cfg's default is the one `--guidance cfg` uses
    assert "Ho & Salimans" in text and "e.g. --guidance apg:scale=3,eta=0" in text
    assert "scale=?" in text  # rescale's required scale
