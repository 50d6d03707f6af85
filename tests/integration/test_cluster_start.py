"""A region starting cold: the services must not race the cluster's own elections.

Found by CI: a three-node cluster answers on its client ports a few seconds before it has a
JetStream meta leader, and until then every JetStream API request times out. A service that
started in that window died in ``ensure_stream``. The cluster here is this module's own, so
it is as fresh as a region's first boot.
"""

from __future__ import annotations

from nats.js.api import StorageType

from shared.contracts import STREAM_NAME
from shared.service import ensure_stream
from tests.integration.test_deploy import Cluster, cluster  # noqa: F401 (a module-scoped fixture)


async def test_a_service_starting_with_the_cluster_waits_for_its_leaders(
    cluster: Cluster,  # noqa: F811 (the fixture imported above)
) -> None:
    # No health wait: connect the moment the client ports accept, as a service would.
    nc = await cluster.connect_platform()
    try:
        js = nc.jetstream()
        await ensure_stream(js, replicas=3)
        info = await js.stream_info(STREAM_NAME)
        assert info.config.num_replicas == 3
        assert info.config.storage == StorageType.FILE
        assert info.cluster is not None and info.cluster.leader
        # A second service starting now finds the stream as it is.
        await ensure_stream(js, replicas=3)
        assert (await js.stream_info(STREAM_NAME)).state.messages == 0
    finally:
        await nc.close()
