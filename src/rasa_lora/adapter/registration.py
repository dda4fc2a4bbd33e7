"""Registering RaSA with PEFT from outside PEFT.

`peft.utils.register_peft_method` requires `name.upper()` to be a member of the `PeftType` enum. Adding an
attribute (`PeftType.RASA = "RASA"`) is not enough: `PeftType("RASA")`, `.value` and membership tests go
through the enum's member tables. So a real member is created and entered in those tables, then the method
is registered. Both steps are idempotent: importing `rasa_lora` twice (or reloading it) registers once.
"""

from __future__ import annotations

from peft.utils import PeftType

RASA_NAME = "rasa"
RASA_PREFIX = "rasa_"


def ensure_peft_type_member(name: str = RASA_NAME) -> PeftType:
    """Return `PeftType.<NAME>`, creating a genuine enum member if PEFT does not have one."""
    value = name.upper()
    if value in PeftType._value2member_map_:
        return PeftType._value2member_map_[value]
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    type.__setattr__(PeftType, value, member)
    return member


def register_rasa(config_cls: type, model_cls: type) -> None:
    """Register RaSA's config and tuner with PEFT (no-op when already registered)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    peft_type = ensure_peft_type_member()
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is not None:
        return
    register_peft_method(name=RASA_NAME, config_cls=config_cls, model_cls=model_cls, prefix=RASA_PREFIX)
