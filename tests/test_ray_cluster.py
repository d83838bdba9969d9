"""Actor shapes no node can hold are refused, at once where nothing can change that."""

import pytest

from bitstorm import ray_cluster
from bitstorm.errors import ConfigError


def test_a_shape_no_node_holds_is_refused_at_once_on_a_private_ray(monkeypatch):
    monkeypatch.setattr(ray_cluster, "largest_node", lambda: (2.0, 0.0))
    monkeypatch.setattr(ray_cluster.time, "sleep", lambda _s: pytest.fail("must not wait"))
    ray_cluster.check_grantable(2, 0, private=True)  # fits: returns
    with pytest.raises(ConfigError, match=r"asks for 1 CPUs and 1 GPUs.*has 2 CPUs and 0 GPUs"):
        ray_cluster.check_grantable(1, 1, private=True)


def test_a_cluster_gets_time_for_its_autoscaler_then_the_same_message(monkeypatch):
    nodes = iter([(4.0, 0.0), (4.0, 0.0), (8.0, 1.0)])  # a GPU node joins on the third look
    monkeypatch.setattr(ray_cluster, "largest_node", lambda: next(nodes))
    monkeypatch.setattr(ray_cluster.time, "sleep", lambda _s: None)
    ray_cluster.check_grantable(1, 1, private=False)
    monkeypatch.setattr(ray_cluster, "largest_node", lambda: (4.0, 0.0))
    monkeypatch.setattr(ray_cluster, "AUTOSCALER_WAIT_S", 0.0)
    with pytest.raises(ConfigError, match=r"largest node of the cluster has 4 CPUs and 0 GPUs"):
        ray_cluster.check_grantable(1, 1, private=False)
