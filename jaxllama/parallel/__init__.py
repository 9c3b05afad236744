"""Past one device and one host: `("data", "model")` meshes, the sharding rules of the parameters,
batch and cache placement, `jax.distributed` start-up and reductions, and the memory estimate.

    mesh = jaxllama.parallel.make_mesh(data=2, model=2)
    model = jaxllama.load(path, mesh=mesh)   # parameters placed by `rules.RULES`
"""

from .distributed import Cluster, check_same_file, cluster_from, gather_rows, initialize, is_main, share
from .memory import CONFIGS, Memory, memory_per_device, memory_table
from .mesh import AXES, check_model_split, make_mesh, mesh_sizes, parse_mesh
from .placement import CACHE_SPEC, put_rows, put_state
from .rules import DEFAULT_VOCAB, RULES, VOCAB_RULES, param_shardings, rules_table, shard_params, spec_for

__all__ = ["AXES", "CACHE_SPEC", "CONFIGS", "Cluster", "DEFAULT_VOCAB", "Memory", "RULES", "VOCAB_RULES",
           "check_model_split", "check_same_file", "cluster_from", "gather_rows", "initialize", "is_main",
           "make_mesh", "memory_per_device", "memory_table", "mesh_sizes", "param_shardings", "parse_mesh",
           "put_rows", "put_state", "rules_table", "share", "shard_params", "spec_for"]
