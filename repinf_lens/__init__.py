"""repinf_lens: representation-level influence functions for TransformerLens and SAELens.

Which training examples, which SAE latents inside them, and which tokens made a language model give an
answer (arXiv 2605.12809, "Correcting Influence", RepInfLLM).

Sign convention, everywhere in this package: a POSITIVE influence score marks a proponent, i.e. up-weighting
the training example lowers the test loss (score = + g_test^T (H + lambda I)^-1 g_train).

API map. The top level holds the main path of a notebook, one name per step (like TransformerLens'
``HookedTransformer`` or Kronfluence's ``Analyzer`` / ``Task``); everything else lives in the module of its
family, reached as ``rl.<module>.<name>`` (``import repinf_lens as rl``):

* ``load_model``: a ``HookedTransformer`` (the embedded default, a shipped finetune, a TL name, a local folder);
* ``finetune``: the paper's LoRA finetune, merged and loaded back (its config and result:
  ``repinf_lens.workflows.finetuning``);
* ``load_mcqa``: OpenBookQA / CommonsenseQA / MedQA, online or offline;
* ``load_sae`` / ``train_sae``: SAELens SAEs from a folder, release or HF repo / trained on collected activations;
* ``Task`` (the contract to implement), ``MultipleChoiceTask`` (the paper's), ``CompletionTask``; ``evaluate``:
  a model's accuracy on a task (``predict``, batches and task errors: ``repinf_lens.task``);
* ``SplitModel``: the model cut at a hook with the SAE spliced in (theta2 downstream); ``check_split``: the split
  against TransformerLens' own forward (inputs and errors: ``repinf_lens.split``; LoRA theta2:
  ``repinf_lens.split.lora``);
* ``CG`` (the default solver; ``CG(preconditioner=EKFAC(...))``: preconditioned CG), ``KFAC`` / ``EKFAC`` (factors
  fitted once on TransformerLens hook points, then each query in one preconditioning pass), ``Identity`` (gradient
  dot product, TracIn-style), ``Woodbury`` (the exact damped Gauss-Newton of a few Hessian rows, inverted in
  sample space; also CG's preconditioner), ``register_solver`` (your own);
* ``InfluenceAttributor``: fit, s_test, attribute; ``InfluenceResult``: top examples, latents, tokens; save/load;
* ``build_sketches`` / ``prefilter``: the gradient-similarity prefilter over a large training set;
* ``RepinfLensError``: the base class of every error the package raises on purpose;
* ``__version__``.

The modules, for everything past the main path:

* ``analysis``: orthogonality (``orthogonality_table``), latent rankings and ablations (``necessity_sufficiency``),
  retraining checks (``leave_one_out``, ``linear_datamodeling_score``);
* ``curvature``: the other solvers (``LiSSA``, ``Explicit``), their base class ``InverseHessianSolver``, HVPs;
* ``data``: dataset helpers (``available_mcqa``, ``from_records``, ``MCQAFormatError``, ...);
* ``errors``: ``SettingsError``, ``NonFiniteError``, ``CorruptFileError``, ``OfflineAssetError`` (and where the
  stage-specific errors live);
* ``influence``: the engine (``latent_influence``, ``example_influence``, ``latent_influence_reference``, ...)
  and ``influence.prefilter`` (``GradientSketcher``, ``SketchStore``, ``PrefilterResult``, ``sketch_overlap``);
* ``models``: ``DEFAULT_MODEL``, ``load_hf_model``, ``SHIPPED_FINETUNES``, ``UnknownModelError``;
* ``saes``: ``collect_activations``, ``layer_sweep``, ``SAETrainingConfig``, ``publish_saes``;
* ``testing``: tiny offline models, tokenizers, SAEs and data (``rl.testing.random_sae``);
* ``viz``: token heatmaps, the example browser, HTML reports (``build_report``).

The stage runners behind the ``repinf-lens`` command are in ``repinf_lens.workflows``.
"""

from repinf_lens import analysis, curvature, data, errors, influence, models, saes, testing, viz
from repinf_lens._version import __version__
from repinf_lens.curvature import CG, EKFAC, KFAC, Identity, Woodbury, register_solver
from repinf_lens.data import load_mcqa
from repinf_lens.errors import RepinfLensError
from repinf_lens.influence import InfluenceAttributor, InfluenceResult, check_split
from repinf_lens.influence.prefilter import build_sketches, prefilter
from repinf_lens.models import load_model
from repinf_lens.saes import load_sae, train_sae
from repinf_lens.split import SplitModel
from repinf_lens.task import CompletionTask, MultipleChoiceTask, Task, evaluate
from repinf_lens.workflows.finetuning import finetune

__all__ = [
    "CG",
    "EKFAC",
    "KFAC",
    "CompletionTask",
    "Identity",
    "InfluenceAttributor",
    "InfluenceResult",
    "MultipleChoiceTask",
    "RepinfLensError",
    "SplitModel",
    "Task",
    "Woodbury",
    "__version__",
    "analysis",
    "build_sketches",
    "check_split",
    "curvature",
    "data",
    "errors",
    "evaluate",
    "finetune",
    "influence",
    "load_mcqa",
    "load_model",
    "load_sae",
    "models",
    "prefilter",
    "register_solver",
    "saes",
    "testing",
    "train_sae",
    "viz",
]
