//! The cleanup step (`95cleanup_images`): the previous images the new environment no longer
//! names, removed in one podman process.

use module_updater_dbus::types::Step;

use super::super::environment::Environment;
use super::super::events::priority;
use super::super::podman::Podman;
use super::context::Ctx;

/// What the cleanup keeps when the previous version is kept: its environment, and that of the
/// version it replaced (`None`: none was kept), whose images go instead.
pub struct Generations<'a> {
    pub kept: &'a Environment,
    pub older: Option<&'a Environment>,
}

/// Removes the stale images; returns those removed. An image still in use, or an environment
/// that cannot be read, is a warning. With `generations`, the kept version's images stay and the
/// older version's go.
pub async fn cleanup(
    ctx: &mut Ctx<'_>,
    podman: &Podman,
    generations: Option<Generations<'_>>,
) -> Vec<String> {
    ctx.begin(Step::CleanupImages);
    let mut removed = Vec::new();
    match Environment::load(&ctx.instance().state_dir.join("environment")) {
        Ok(env) => {
            let stale = match &generations {
                None => stale_images(&env),
                Some(generations) => older_images(&env, generations),
            };
            for old in &stale {
                ctx.message(priority::INFO, format!("Removing {old}"));
            }
            for (old, outcome) in podman.remove_images(&stale).await {
                match outcome {
                    Ok(()) => removed.push(old),
                    Err(err) => ctx.warning(format!("cannot remove image {old}: {err}")),
                }
            }
        }
        Err(err) => {
            ctx.warning(format!(
                "cleanup skipped: cannot read the environment: {err}"
            ));
            return removed;
        }
    }
    ctx.end(Step::CleanupImages);
    removed
}

/// Previous images the environment no longer names: `PREV_X_IMAGE` ≠ `X_IMAGE`, and
/// `PREV_IMAGE_URL` ≠ `IMAGE_URL`, never one that a current key still names.
pub fn stale_images(env: &Environment) -> Vec<String> {
    let current = current_images(env);
    let mut stale: Vec<String> = Vec::new();
    for (key, old) in env.iter() {
        let Some(name) = key.strip_prefix("PREV_") else {
            continue;
        };
        if !(name.ends_with("_IMAGE") || name == "IMAGE_URL") || old.is_empty() {
            continue;
        }
        if env.get(name) != Some(old)
            && !current.iter().any(|c| c == old)
            && !stale.iter().any(|s| s == old)
        {
            stale.push(old.to_owned());
        }
    }
    stale
}

/// The images of the older version that neither the environment nor the kept version names.
pub fn older_images(env: &Environment, generations: &Generations<'_>) -> Vec<String> {
    let Some(older) = generations.older else {
        return Vec::new();
    };
    let named: Vec<String> = current_images(env)
        .into_iter()
        .chain(current_images(generations.kept))
        .collect();
    let mut stale: Vec<String> = Vec::new();
    for image in current_images(older) {
        if !image.is_empty() && !named.contains(&image) && !stale.contains(&image) {
            stale.push(image);
        }
    }
    stale
}

/// The images the environment names now: `IMAGE_URL` and every `X_IMAGE`.
pub fn current_images(env: &Environment) -> Vec<String> {
    env.iter()
        .filter(|(k, _)| !k.starts_with("PREV_") && (k.ends_with("_IMAGE") || *k == "IMAGE_URL"))
        .map(|(_, v)| v.to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_images_never_include_a_current_one() {
        let env = Environment::parse(
            "IMAGE_URL=r/demo:2\nPREV_IMAGE_URL=r/demo:1\nDB_IMAGE=r/db:2\nPREV_DB_IMAGE=r/db:1\n\
             CACHE_IMAGE=r/cache:1\nPREV_CACHE_IMAGE=r/cache:1\nOTHER_IMAGE=r/db:1b\nPREV_X_IMAGE=r/cache:1\n",
        );
        assert_eq!(
            stale_images(&env),
            vec!["r/db:1".to_owned(), "r/demo:1".to_owned()]
        );
    }
}
