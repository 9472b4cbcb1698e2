"""The client tests run against the router tests' mesh: a real router in front of fakes."""

from tests.integration.router.conftest import Mesh, mesh

__all__ = ["Mesh", "mesh"]
