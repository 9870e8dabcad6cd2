//! NS8's cluster: after an instance's update the daemon refreshes the cluster's copy of its
//! environment, the Redis hash `module/<id>/environment`, as NS8's agent does at the end of each
//! of its actions (one transaction: DEL, then HSET of every key of the `environment` file). The
//! UI and the cluster's actions read a module's version there.
//!
//! The node's agent settings (`/etc/nethserver/agent.env` by default) give the Redis address
//! (`REDIS_ADDRESS`); the instance's own `state/agent.env` gives its credentials (`REDIS_USER`,
//! `REDIS_PASSWORD`), so the daemon writes with the rights NS8 gave that module and no more. Not
//! an NS8 node (no agent settings file): nothing is done. Anything else that stops the refresh is
//! a warning of the instance's result, never a failed update.

use std::path::Path;
use std::time::Duration;

use crate::engine::environment::Environment;
use crate::engine::instance::Instance;

/// NS8's agent settings on a node.
pub const DEFAULT_AGENT_ENV: &str = "/etc/nethserver/agent.env";

/// How long the connection to Redis and each answer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
enum RefreshError {
    #[error("{0} has no REDIS_ADDRESS")]
    NoAddress(String),
    #[error("REDIS_ADDRESS {0:?} of {1} is not HOST:PORT")]
    BadAddress(String, String),
    #[error("{0} is missing, unreadable or not owned by the instance's user")]
    NoCredentials(String),
    #[error("{0} has no REDIS_USER or REDIS_PASSWORD")]
    IncompleteCredentials(String),
    #[error("the instance's environment file cannot be read")]
    NoEnvironment,
    #[error("Redis at {address}: {source}")]
    Redis {
        address: String,
        source: redis::RedisError,
    },
}

/// Refreshes `module/<id>/environment` from the instance's environment file. `None` when done
/// or when this is not an NS8 node; otherwise the warning for the instance's result.
pub async fn refresh_environment(agent_env: &Path, instance: &Instance) -> Option<String> {
    let node = read_node_settings(agent_env).await?;
    let key = format!("module/{}/environment", instance.id);
    let owned = instance.clone();
    let read = tokio::task::spawn_blocking(move || (owned.agent_env(), owned.environment()))
        .await
        .ok()?;
    match refresh(agent_env, &node, instance, &key, read).await {
        Ok(()) => {
            log::info!(MODULE_UPDATER_INSTANCE = instance.id.as_str(); "{}: refreshed {key} in the cluster's Redis", instance.id);
            None
        }
        Err(err) => Some(format!(
            "the cluster's copy of the environment ({key}) was not refreshed: {err}; NS8's agent \
             refreshes it at the end of the module's next task"
        )),
    }
}

/// The node's agent settings, `None` when the file does not exist (not an NS8 node).
async fn read_node_settings(agent_env: &Path) -> Option<Environment> {
    let path = agent_env.to_owned();
    tokio::task::spawn_blocking(move || std::fs::read_to_string(path).ok())
        .await
        .ok()
        .flatten()
        .map(|text| Environment::parse(&text))
}

async fn refresh(
    agent_env: &Path,
    node: &Environment,
    instance: &Instance,
    key: &str,
    (credentials, environment): (Option<Environment>, Option<Environment>),
) -> Result<(), RefreshError> {
    let shown = agent_env.display().to_string();
    let address = node
        .get("REDIS_ADDRESS")
        .map(unquote)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| RefreshError::NoAddress(shown.clone()))?;
    let (host, port) = address
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host.trim_matches(['[', ']']), port.parse::<u16>().ok()?)))
        .filter(|(host, _)| !host.is_empty())
        .ok_or_else(|| RefreshError::BadAddress(address.to_owned(), shown))?;
    let credentials_path = instance.state_dir.join("agent.env").display().to_string();
    let credentials =
        credentials.ok_or_else(|| RefreshError::NoCredentials(credentials_path.clone()))?;
    let (Some(user), Some(password)) = (
        credentials.get("REDIS_USER").map(unquote),
        credentials.get("REDIS_PASSWORD").map(unquote),
    ) else {
        return Err(RefreshError::IncompleteCredentials(credentials_path));
    };
    let environment = environment.ok_or(RefreshError::NoEnvironment)?;
    let redis_error = |source| RefreshError::Redis {
        address: address.to_owned(),
        source,
    };
    let info = redis::IntoConnectionInfo::into_connection_info(redis::ConnectionAddr::Tcp(
        host.to_owned(),
        port,
    ))
    .map_err(redis_error)?
    .set_redis_settings(
        redis::RedisConnectionInfo::default()
            .set_username(user)
            .set_password(password),
    );
    let client = redis::Client::open(info).map_err(redis_error)?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    let mut connection = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(redis_error)?;
    let pairs: Vec<(&str, &str)> = environment.iter().collect();
    let mut transaction = redis::pipe();
    transaction.atomic().del(key).ignore();
    if !pairs.is_empty() {
        transaction.hset_multiple(key, &pairs).ignore();
    }
    transaction
        .query_async::<()>(&mut connection)
        .await
        .map_err(redis_error)
}

/// A value of a systemd environment file may be quoted.
fn unquote(value: &str) -> &str {
    let value = value.trim();
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
        .unwrap_or(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_are_unquoted() {
        assert_eq!(unquote("\"cluster-leader:6379\""), "cluster-leader:6379");
        assert_eq!(unquote("'x'"), "x");
        assert_eq!(unquote(" plain "), "plain");
        assert_eq!(unquote("\""), "\"");
    }
}
