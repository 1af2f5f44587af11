"""The solver registry: a toy solver added with one `register_solver` call runs through the API and the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from repinf_lens import Identity, InfluenceAttributor, SplitModel, register_solver
from repinf_lens.curvature import (
    CG,
    SOLVERS,
    InverseHessianSolver,
    LiSSA,
    SolveInfo,
    build_solver,
    get_solver_class,
    list_solvers,
    solver_from_dict,
    unregister_solver,
)
from repinf_lens.errors import SettingsError
from repinf_lens.testing import random_sae, tiny_hf_llama, tiny_model, toy_mcqa_rows

HOOK = "blocks.0.hook_resid_post"


@dataclass
class ScaledIdentity(InverseHessianSolver):
    """s = g / (c + damping): the inverse of the curvature ``c I`` (no Hessian data needed)."""

    c: float = 2.0
    config_knobs: ClassVar[dict[str, str]] = {"damping": "damping"}

    @property
    def needs_hessian(self) -> bool:
        return False

    def solve(self, hvp_fn, g):
        return {k: v / (self.c + self.damping) for k, v in g.items()}, SolveInfo()


@pytest.fixture(autouse=True)
def registry_restored():
    """Every test leaves the registry as it found it (built-ins back, toys gone)."""
    before = dict(SOLVERS)
    yield
    for name in set(SOLVERS) - set(before):
        unregister_solver(name)
    for name, cls in before.items():
        if SOLVERS.get(name) is not cls:
            register_solver(name, cls, overwrite=True)
    assert dict(SOLVERS) == before


@pytest.fixture()
def toy():
    register_solver("toy", ScaledIdentity)
    yield ScaledIdentity
    if "toy" in SOLVERS:
        unregister_solver("toy")


@pytest.fixture(scope="module")
def split():
    model = tiny_model(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=0)
    return SplitModel(model, HOOK, random_sae(model, HOOK, d_sae=16, k=4))


def test_builtins_are_registered_and_built_from_the_generic_knobs():
    assert list_solvers() == ["cg", "ekfac", "explicit", "identity", "kfac", "lissa", "woodbury"] == sorted(SOLVERS)
    knobs = dict(damping=0.1, gauss_newton=True, max_iter=7, batch_size=3)
    assert build_solver("cg", **knobs) == CG(damping=0.1, gauss_newton=True, max_iter=7, batch_size=3)
    assert build_solver("lissa", **knobs) == LiSSA(damping=0.1, gauss_newton=True, depth=7)  # max_iter -> depth
    assert build_solver("identity", **knobs) == Identity()  # takes no knob
    assert build_solver("lissa", max_iter=None, scale=50.0) == LiSSA(scale=50.0)  # None: the field's default
    with pytest.raises(TypeError):
        SOLVERS["mine"] = ScaledIdentity  # a read-only view


def test_toy_solver_through_the_attributor_equals_identity_over_the_constant(toy, split, tmp_path, monkeypatch):
    from repinf_lens.workflows import AttributionConfig, build_attributor

    monkeypatch.setenv("REPINF_LENS_CACHE", str(tmp_path / "cache"))
    rows = toy_mcqa_rows(6)
    cfg = AttributionConfig(solver="toy", damping=0.5, gauss_newton=True, max_iter=3)  # registered after import
    att = build_attributor(split, cfg, progress=False)
    assert att.solver == ScaledIdentity(damping=0.5)  # only its own knob (damping) was passed
    got = att.attribute(rows[:2], rows)
    ref = InfluenceAttributor(split, hessian=Identity(), use_cache=False, progress=False).attribute(rows[:2], rows)
    assert got.example_scores.abs().max() > 0
    for name in ("example_scores", "latent_scores"):  # float32 rounding: tolerances relative to the largest score
        want = getattr(ref, name) / 2.5
        torch.testing.assert_close(getattr(got, name), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert got.meta["solver"]["solver"] == "toy"
    assert solver_from_dict(got.meta["solver"]) == att.solver  # the stored config round-trips


def test_toy_solver_through_the_cli(toy, tmp_path, monkeypatch, capsys):
    from repinf_lens.cli import main
    from repinf_lens.influence.result import InfluenceResult
    from repinf_lens.models import load_model

    monkeypatch.setenv("REPINF_LENS_CACHE", str(tmp_path / "cache"))
    folder, sae_dir = tmp_path / "tiny", tmp_path / "sae"
    tiny_hf_llama(folder)
    random_sae(load_model(folder, device="cpu", n_ctx=64), HOOK, d_sae=16, k=2).save_model(str(sae_dir))
    monkeypatch.setattr("repinf_lens.cli._split", lambda args, split, limit: toy_mcqa_rows(limit or 4))
    argv = ["attribute", "--model", str(folder), "--sae", str(sae_dir), "--no-progress", "--template", "plain",
            "--train-limit", "5", "--query-limit", "2", "--damping", "1.5"]  # fmt: skip
    assert main([*argv, "--solver", "toy", "--out", str(tmp_path / "toy")]) == 0, capsys.readouterr().err
    assert main([*argv, "--solver", "identity", "--out", str(tmp_path / "id")]) == 0, capsys.readouterr().err
    got, ref = InfluenceResult.load(tmp_path / "toy" / "result"), InfluenceResult.load(tmp_path / "id" / "result")
    assert got.example_scores.shape == (2, 5) and got.example_scores.abs().max() > 0
    want = ref.example_scores / 3.5
    torch.testing.assert_close(got.example_scores, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert json.loads((tmp_path / "toy" / "manifest.json").read_text())["args"]["solver"] == "toy"
    unregister_solver("toy")  # --solver's choices are read from the registry when main() parses
    assert main([*argv, "--solver", "toy", "--out", str(tmp_path / "gone")]) == 2
    assert "invalid choice: 'toy'" in capsys.readouterr().err


def test_unknown_solver_names_the_registered_ones_and_the_closest():
    from repinf_lens.workflows import AttributionConfig

    with pytest.raises(SettingsError, match=r"AttributionConfig solver must be one of the registered") as err:
        AttributionConfig(solver="lisa")
    with pytest.raises(SettingsError, match=r"Unknown solver 'lisa'\. Did you mean 'lissa'\?") as err2:
        get_solver_class("lisa")
    for e in (err, err2):
        registered = "['cg', 'ekfac', 'explicit', 'identity', 'kfac', 'lissa', 'woodbury']"
        assert registered in str(e.value) and "Did you mean 'lissa'?" in str(e.value)
        assert "Fix:" in str(e.value) and "register_solver" in str(e.value)
    with pytest.raises(SettingsError, match="Unknown solver 'newton'"):
        solver_from_dict({"solver": "newton"})
    with pytest.raises(SettingsError, match=r"has no setting \['depth'\]"):
        solver_from_dict({"solver": "cg", "depth": 3})


def test_registering_a_taken_name_raises_unless_overwrite(toy):
    @dataclass
    class Other(ScaledIdentity):
        pass

    with pytest.raises(SettingsError, match="'toy' is already registered.*overwrite=True"):
        register_solver("toy", Other)
    with pytest.raises(SettingsError, match="'cg' is already registered"):
        register_solver("cg", Other)
    assert get_solver_class("toy") is ScaledIdentity
    assert register_solver("toy", ScaledIdentity) is ScaledIdentity  # the same class again: a no-op
    assert register_solver("toy", Other, overwrite=True) is Other
    assert get_solver_class("toy") is Other and Other().to_dict()["solver"] == "toy"


def test_register_as_a_decorator_and_refusals():
    @register_solver("halved")
    @dataclass
    class Halved(ScaledIdentity):
        c: float = 2.0

    assert get_solver_class("halved") is Halved and Halved.name == "halved"
    assert build_solver("halved", damping=0.0).solve(None, {"w": torch.ones(2)})[0]["w"].tolist() == [0.5, 0.5]
    with pytest.raises(TypeError, match="not an InverseHessianSolver subclass"):
        register_solver("nope", dict)
    with pytest.raises(SettingsError, match="declares name = 'cg'"):
        register_solver("cg2", CG)  # to_dict() would record 'cg'
    with pytest.raises(SettingsError, match="not a usable solver name"):
        register_solver("my solver", ScaledIdentity)

    @dataclass
    class BadKnobs(ScaledIdentity):
        config_knobs: ClassVar[dict[str, str]] = {"max_iter": "steps", "tol": "c"}

    with pytest.raises(SettingsError, match=r"\['tol'\] are not generic knobs.*\['steps'\] are not dataclass fields"):
        register_solver("bad", BadKnobs)
    assert "bad" not in SOLVERS and "nope" not in SOLVERS


def test_default_solvers_come_from_the_registry():
    from repinf_lens.analysis.lds import default_solvers

    assert default_solvers(0.01) == {
        "cg": CG(damping=0.01, max_iter=100, tol=1e-8),
        "lissa": LiSSA(damping=0.01, scale=50.0, depth=400),
        "identity": Identity(),
    }
    register_solver("toy", ScaledIdentity)
    assert default_solvers(0.25, names=["toy"]) == {"toy": ScaledIdentity(damping=0.25)}
