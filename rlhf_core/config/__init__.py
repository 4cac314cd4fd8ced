"""The typed params tree: the only reader of params.yaml.

    sections.py   the section models (one field per knob: type, default, range, one line of documentation)
    rules.py      the cross-field rules, one named function each (validate runs them)
    loading.py    params.yaml → Params: YAML 1.2, moved keys, one-line errors (load_params, params_from_dict)
    yaml12.py     YAML as DVC reads and writes it
    rendering.py  params.yaml and docs/params.md from the tree (docs and tests only: outside every stage's
                  code fingerprint)


Every knob of the pipeline is a field of a frozen pydantic model below, with its type, its default, its
allowed range and one line of documentation.  ``load_params`` parses params.yaml (YAML 1.2, as DVC writes it),
rejects unknown keys, wrong types and out-of-range values with one line that names the key and what is
allowed, runs the cross-field checks of ``Params.validate`` and returns a frozen ``Params`` tree.  It imports
nothing heavy, so a stage validates its params before any model is loaded.

One place per knob: what every algorithm's update loop uses is in ``optim``, every KL setting in ``kl``; an
algorithm's own section keeps only what is specific to it.  A key that moved gets one line naming its new place.
"""

from rlhf_core.config.loading import MOVED, flatten, load_params, params_from_dict, replace
from rlhf_core.config.sections import *  # noqa: F403  (every section model, Params, TASKS, SCORER_KINDS, …)
from rlhf_core.config.yaml12 import yaml_load, yaml_scalar

__all__ = ["MOVED", "flatten", "load_params", "params_from_dict", "replace", "yaml_load", "yaml_scalar"]
