//! CustomResourceDefinition (`apiextensions.k8s.io`).

use serde_json::Value;

use crate::Result;
use crate::fields::{self, Malformed};

/// CustomResourceDefinition: `Current` once `Established=True`. `NamesAccepted=False`
/// (a name conflict) is `Failed`, as is `Established=False` for any reason other
/// than `Installing`. Anything else is still being installed.
pub fn custom_resource_definition(object: &Value) -> std::result::Result<Result, Malformed> {
    for condition in fields::conditions(object)? {
        match condition.condition_type.as_str() {
            "NamesAccepted" if condition.is_false() => {
                return Ok(Result::failed(&condition.reason, condition.message));
            }
            "Established" if condition.is_false() && condition.reason != "Installing" => {
                return Ok(Result::failed(&condition.reason, condition.message));
            }
            "Established" if condition.is_true() => {
                return Ok(Result::current("CRD is established"));
            }
            _ => {}
        }
    }
    Ok(Result::in_progress("Installing", "Install in progress"))
}
