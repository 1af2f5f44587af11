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
    "SAETrainingConfig",
    "SweepResult",
    "TrainedSAE",
    "check_sae_compatibility",
    "collect_activations",
    "find_sae_folders",
    "hook_layer",
    "layer_sweep",
    "load_sae",
    "middle_layers",
    "publish_saes",
    "registry_block",
    "sae_hook_name",
    "sae_stats",
    "spliced_accuracy",
    "train_sae",
]
