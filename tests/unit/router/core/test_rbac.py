"""Role decisions: which methods, models and priority classes a role allows, and role specs."""

from __future__ import annotations

import pytest

from services.router.core.rbac import BUILTIN_ROLES, METHOD_GROUPS, RoleError, build_roles, parse_role

GENERATE = "/infermesh.router.v1.Inference/Generate"
CREATE_KEY = "/infermesh.router.v1.Admin/CreateApiKey"


def test_admin_may_call_every_public_method():
    admin = BUILTIN_ROLES["admin"]
    assert all(admin.denies_method(m) is None for m in METHOD_GROUPS)


def test_user_is_refused_admin_calls_and_critical_priority_with_the_reason():
    user = BUILTIN_ROLES["user"]
    assert user.denies_method(GENERATE) is None
    why = user.denies_method(CREATE_KEY)
    assert why is not None and "CreateApiKey" in why and "'admin'" in why
    assert user.denies_priority("critical") == "role 'user' may not use priority CRITICAL"
    assert user.denies_priority("interactive") is None


def test_unknown_methods_are_refused():
    assert BUILTIN_ROLES["admin"].denies_method("/other.Service/Call") is not None


def test_spec_with_models_and_priorities():
    role = parse_role("analyst:rpcs=inference,sessions:models=m1,m2:priorities=standard,BATCH")
    assert role.groups == {"inference", "sessions"}
    assert role.denies_model("m1") is None
    assert role.denies_model("m3") == "role 'analyst' may not use model 'm3'"
    assert role.denies_priority("batch") is None
    assert role.denies_priority("interactive") is not None


def test_star_and_left_out_fields_mean_all():
    role = parse_role("wide:models=*")
    assert role.models is None
    assert all(role.denies_method(m) is None for m in METHOD_GROUPS)


def test_empty_list_means_none():
    role = parse_role("nothing:rpcs=")
    assert role.denies_method(GENERATE) is not None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "needs a name"),
        ("x:rpcs=inference,fly", "unknown fly"),
        ("x:priorities=urgent", "unknown urgent"),
        ("x:colour=blue", "unknown field 'colour'"),
        ("x:models", "must read key=value"),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(RoleError, match=message):
        parse_role(spec)


def test_config_roles_override_builtins():
    roles = build_roles(["user:rpcs=inference:priorities=batch"])
    assert roles["user"].denies_priority("standard") is not None
    assert set(BUILTIN_ROLES) <= set(roles)
