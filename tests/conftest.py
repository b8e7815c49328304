"""Test-suite configuration: hypothesis runs without deadlines (JIT compiles happen inside examples)."""

from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")
