"""Shared pytest configuration for the fastdist test suite.

``services.plugin`` provides fixtures that start real servers (sshd, network
namespace hosts, a one-node Slurm cluster) for the integration tests.
"""

pytest_plugins = ["services.plugin"]
