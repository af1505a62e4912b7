"""ParallelDims: the one object that answers every rank, degree and group question.

Built once from ``[parallelism]`` and the world size, then passed to whoever needs
it. The device mesh has the dims [pp, dp_replicate, dp_shard, cp, tp] (only those
> 1, in that order) plus flattened views:

- ``dp``: dp_replicate x dp_shard, the data-loading dim (each dp rank gets its rows);
- ``dp_shard_cp``: dp_shard x cp, what FSDP shards parameters over;
- ``dp_cp``: dp_replicate x dp_shard x cp, what the loss is averaged over.
"""

from dataclasses import dataclass, field

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

_MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    world_size: int
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

    def _mismatch_message(self, what: str) -> str:
        return (
            f"parallel degrees do not fit the world size ({what}): dp_replicate={self.dp_replicate} x "
            f"dp_shard={self.dp_shard} x cp={self.cp} x tp={self.tp} x pp={self.pp} must equal "
            f"world_size={self.world_size}. Set the [parallelism] degrees so they multiply to the number "
            f"of processes (NGPU x nodes), or use dp_shard = -1 to take what is left."
        )

    def build_mesh(self, device_type: str) -> DeviceMesh:
        dims = [(n, d) for n, d in zip(_MESH_ORDER, self._degrees()) if d > 1]
        if not dims:  # a single process still gets a mesh, so callers need no special case
            dims = [("dp_shard", 1)]
        names, shape = zip(*dims)
        mesh = init_device_mesh(device_type, tuple(shape), mesh_dim_names=tuple(names))
        self._flatten(mesh, "dp", ("dp_replicate", "dp_shard"))
        self._flatten(mesh, "dp_shard_cp", ("dp_shard", "cp"))
        self._flatten(mesh, "dp_cp", ("dp_replicate", "dp_shard", "cp"))
        self._mesh = mesh
        return mesh

    def _flatten(self, mesh: DeviceMesh, name: str, parts: tuple[str, ...]):
        present = tuple(p for p in parts if p in mesh.mesh_dim_names)
        if present:
            # Flattening even a single dim gives every caller one name to ask for.
            self._flat[name] = mesh[present]._flatten(mesh_dim_name=name)

    def _degrees(self) -> tuple[int, ...]:
        return (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)

    @property
    def mesh(self) -> DeviceMesh:
        assert self._mesh is not None, "call build_mesh first"
        return self._mesh

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
    def non_data_parallel_size(self) -> int:
        """Devices that together process one sequence: tokens/s per device divides by this."""
        return self.cp * self.tp * self.pp

