"""SAEs in SAELens format: activations, training, the layer sweep, loading and publishing."""

from repinf_lens.saes.activations import ActivationStore, collect_activations, hook_layer
from repinf_lens.saes.loading import check_sae_compatibility, find_sae_folders, load_sae, sae_hook_name
from repinf_lens.saes.publish import PublishResult, publish_saes, registry_block
from repinf_lens.saes.sweep import PAPER_GRID, SweepResult, layer_sweep, middle_layers, spliced_accuracy
from repinf_lens.saes.training import SAETrainingConfig, TrainedSAE, sae_stats, train_sae

__all__ = [
    "PAPER_GRID",
    "ActivationStore",
    "PublishResult",
    "check_sae_compatibility",
    "find_sae_folders",
    "load_sae",
    "publish_saes",
    "registry_block",
    "sae_hook_name",
    "SAETrainingConfig",
    "SweepResult",
    "TrainedSAE",
    "collect_activations",
    "hook_layer",
    "layer_sweep",
    "middle_layers",
    "sae_stats",
    "spliced_accuracy",
    "train_sae",
]
