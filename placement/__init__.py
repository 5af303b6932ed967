"""Pure expert-placement algorithms: numpy in, numpy out.

Usable on its own from any serving engine. Never imports ray, torch.distributed, triton or cuda
(tests/unit/test_placement_purity.py keeps it that way).
"""

from placement.layout import FREE_SLOT, Migration, Placement, Topology, migration_between

__all__ = ["FREE_SLOT", "Migration", "Placement", "Topology", "migration_between"]
