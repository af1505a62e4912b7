"""ParallelDims: the one object that answers every rank, degree and group question.

Built once from ``[parallelism]`` and the world size, then passed to whoever needs
it. The device mesh has the dims [pp, dp_replicate, dp_shard, cp, tp] (only those
> 1, in that order) plus flattened views:

- ``dp``: dp_replicate x dp_shard, the data-loading dim (each dp rank gets its rows);
- ``dp_shard_cp``: dp_shard x cp, what FSDP shards parameters over;
- ``dp_cp``: dp_replicate x dp_shard x cp, what the loss is averaged over.

Expert parallelism (``ep`` > 1) is carved out of dp_shard x cp, as torchtitan does: dp_shard
splits into dp_shard_mod_ep x dp_shard_in_ep (ep = dp_shard_in_ep x cp), the mesh dims become
[pp, dp_replicate, dp_shard_mod_ep, dp_shard_in_ep, cp, tp] and the flattened views add ``dp_shard``
(the two halves), ``ep`` (dp_shard_in_ep x cp: the all-to-all group) and the experts' FSDP dim
dp_shard_mod_ep (kept even at size 1). Every name above still answers. With ep == 1 the mesh is
exactly the one without EP.
"""

from dataclasses import dataclass, field

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

_MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
_EP_MESH_ORDER = ("pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp", "tp")
_DP_SHARD = ("dp_shard", "dp_shard_mod_ep", "dp_shard_in_ep")  # whichever are present


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    world_size: int
    ep: int = 1
    _mesh: DeviceMesh | None = field(default=None, repr=False)
    # torch deprecates slicing flattened dims from the root mesh: keep them here.
    _flat: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._validate()

    def _validate(self):
        degrees = {"dp_replicate": self.dp_replicate, "cp": self.cp, "tp": self.tp, "pp": self.pp}
        for name, d in degrees.items():
            if d < 1:
                raise ValueError(f"parallelism.{name} must be >= 1, got {d}")
        others = self.dp_replicate * self.cp * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise ValueError(self._mismatch_message("cannot fill dp_shard=-1"))
            self.dp_shard = self.world_size // others
        if self.dp_shard < 1 or others * self.dp_shard != self.world_size:
            raise ValueError(self._mismatch_message("the product is not the world size"))
        self._validate_ep()

    def _validate_ep(self):
        ep, sparse = self.ep, self.dp_shard * self.cp
        if ep < 1:
            raise ValueError(f"parallelism.ep must be >= 1, got {ep}")
        if sparse % ep:
            raise ValueError(
                f"parallelism.ep={ep} must divide dp_shard x cp = {self.dp_shard} x {self.cp} = {sparse} "
                f"(the experts are spread over data-parallel ranks); pick an ep that divides {sparse}"
            )
        if ep > 1 and ep % self.cp:
            raise ValueError(
                f"parallelism.ep={ep} must be a multiple of cp={self.cp} (a cp group shares its experts' "
                f"tokens); pick ep = cp x a divisor of dp_shard={self.dp_shard}"
            )

    def _mismatch_message(self, what: str) -> str:
        return (
            f"parallel degrees do not fit the world size ({what}): dp_replicate={self.dp_replicate} x "
            f"dp_shard={self.dp_shard} x cp={self.cp} x tp={self.tp} x pp={self.pp} must equal "
            f"world_size={self.world_size}. Set the [parallelism] degrees so they multiply to the number "
            f"of processes (NGPU x nodes), or use dp_shard = -1 to take what is left."
        )

    def build_mesh(self, device_type: str) -> DeviceMesh:
        dims = [(n, d) for n, d in self._mesh_dims() if d > 1 or n == "dp_shard_mod_ep"]
        if not dims:  # a single process still gets a mesh, so callers need no special case
            dims = [("dp_shard", 1)]
        names, shape = zip(*dims)
        mesh = init_device_mesh(device_type, tuple(shape), mesh_dim_names=tuple(names))
        if self.ep_enabled:
            # Flattened first, so the names below that include dp_shard find it.
            self._flatten(mesh, "dp_shard", ("dp_shard_mod_ep", "dp_shard_in_ep"))
            self._flatten(mesh, "ep", ("dp_shard_in_ep", "cp"))
        self._flatten(mesh, "dp", ("dp_replicate", *_DP_SHARD))
        self._flatten(mesh, "dp_shard_cp", (*_DP_SHARD, "cp"))
        self._flatten(mesh, "dp_cp", ("dp_replicate", *_DP_SHARD, "cp"))
        self._mesh = mesh
        return mesh

    def _mesh_dims(self) -> list[tuple[str, int]]:
        if not self.ep_enabled:
            return list(zip(_MESH_ORDER, self._degrees()))
        in_ep = self.ep // self.cp
        sizes = (self.pp, self.dp_replicate, self.dp_shard // in_ep, in_ep, self.cp, self.tp)
        return list(zip(_EP_MESH_ORDER, sizes))

    def _flatten(self, mesh: DeviceMesh, name: str, parts: tuple[str, ...]):
        present = tuple(p for p in parts if p in mesh.mesh_dim_names)
        if present and name not in self._flat:
            # Flattening even a single dim gives every caller one name to ask for.
            self._flat[name] = mesh[present]._flatten(mesh_dim_name=name)

    def _degrees(self) -> tuple[int, ...]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)

    @property
    def mesh(self) -> DeviceMesh:
        assert self._mesh is not None, "call build_mesh first"
        return self._mesh

    def describe(self) -> dict:
        """The degrees and the world size, resolved (dp_shard = -1 filled in), for run records."""
        names = ("world_size", "dp_replicate", "dp_shard", "cp", "tp", "pp", "ep")
        return {name: getattr(self, name) for name in names}

    def layout_line(self) -> str:
        """One line naming every dimension in use and what it carries, e.g.
        ``layout: 4 ranks = dp_shard 2 (FSDP) x tp 2 (tensor); ep 2 (experts, borrows dp_shard)``."""
        roles = {
            "pp": "pipeline stages",
            "dp_replicate": "HSDP replicas" if self.dp_shard > 1 or self.cp > 1 else "DDP replicas",
            "dp_shard": "FSDP",
            "cp": "sequence split; FSDP shards over it too",
            "tp": "tensor",
        }
        used = [f"{n} {d} ({roles[n]})" for n, d in zip(_MESH_ORDER, self._degrees()) if d > 1]
        ranks = f"{self.world_size} rank{'s' if self.world_size != 1 else ''}"
        if not used:
            return f"layout: {ranks}, no parallelism"
        line = f"layout: {ranks} = {' x '.join(used)}"
        if self.ep_enabled:
            borrowed = " x ".join(n for n, d in (("dp_shard", self.dp_shard), ("cp", self.cp)) if d > 1)
            line += f"; ep {self.ep} (experts, borrows {borrowed}: no extra ranks)"
        return f"{line}; data-parallel degree {self.dp}"

    def has(self, name: str) -> bool:
        return self._mesh is not None and (name in self._mesh.mesh_dim_names or name in self._flat)

    def submesh(self, name: str) -> DeviceMesh:
        """A mesh dim or flattened dim by name, e.g. 'tp', 'dp', 'dp_shard_cp'."""
        assert self.has(name), f"mesh has no dim {name!r}"
        return self._flat[name] if name in self._flat else self.mesh[name]

    def coordinate(self, name: str) -> int:
        """This rank's index along a (possibly flattened) mesh dim; 0 when the dim is absent."""
        return self.submesh(name).get_local_rank() if self.has(name) else 0

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_rank(self) -> int:
        return self.coordinate("dp")

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1 or self.cp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    def fsdp_mesh(self) -> DeviceMesh:
        """What FSDP shards the (non-expert) parameters over: dp_shard_cp, or for HSDP the 2-D
        (dp_replicate, dp_shard_cp) mesh (replicate over the first dim, shard over the second)."""
        if self.dp_replicate == 1:
            return self.submesh("dp_shard_cp")
        if self.cp == 1 and not self.ep_enabled:
            return self.mesh["dp_replicate", "dp_shard"]
        return self._pair("dp_replicate", "dp_shard_cp")

    def ep_mesh(self) -> DeviceMesh:
        """The expert-parallel group (dp_shard_in_ep x cp): experts are split and tokens all-to-all'd over it."""
        assert self.ep_enabled, "ep_mesh needs parallelism.ep > 1"
        return self.submesh("ep")

    def ep_tp_mesh(self) -> DeviceMesh:
        """The 2-D [ep, tp] mesh of expert-tensor parallelism (EP x TP)."""
        assert self.ep_enabled and self.tp_enabled, "ep_tp_mesh needs parallelism.ep > 1 and tp > 1"
        return self._pair("ep", "tp")

    def expert_fsdp_mesh(self) -> DeviceMesh:
        """What FSDP shards the experts over: the data-parallel ranks outside the EP group
        (dp_shard_mod_ep, maybe of size 1), or (dp_replicate, dp_shard_mod_ep) for HSDP."""
        assert self.ep_enabled, "expert_fsdp_mesh needs parallelism.ep > 1"
        if self.dp_replicate == 1:
            return self.mesh["dp_shard_mod_ep"]
        return self.mesh["dp_replicate", "dp_shard_mod_ep"]

    def _pair(self, first: str, second: str) -> DeviceMesh:
        # A 2-D mesh from (possibly flattened) dims: concatenating the kept 1-D meshes avoids
        # slicing flattened dims off the root, which torch deprecates.
        return DeviceMesh._concatenate([self.submesh(first), self.submesh(second)])

    @property
    def fsdp_gradient_divide_factor(self) -> int:
        """The experts' FSDP divides gradients by this (all data-parallel ranks), not by its own
        smaller mesh: the all-to-all's backward already summed the expert grads over the EP group."""
        return self.dp_replicate * self.dp_shard * self.cp

    @property
    def non_data_parallel_size(self) -> int:
        """Devices that together process one sequence: tokens/s per device divides by this."""
        return self.cp * self.tp * self.pp


def batch_split(global_bs: int, local_bs: int, dp: int) -> tuple[int, int]:
    """(local batch, gradient accumulation steps) from the global and local batch sizes
    (``local_bs`` -1: the global batch split evenly over dp, no accumulation)."""
    if global_bs % dp:
        raise ValueError(
            f"training.global_batch_size={global_bs} does not divide by the data-parallel degree {dp}; "
            f"use a multiple of {dp}"
        )
    local_bs = global_bs // dp if local_bs == -1 else local_bs
    if local_bs <= 0 or global_bs % (local_bs * dp):
        raise ValueError(
            f"training.global_batch_size={global_bs} must be a multiple of local_batch_size={local_bs} x "
            f"data-parallel degree {dp}; gradient accumulation is global / (local x dp)"
        )
    return local_bs, global_bs // (local_bs * dp)
