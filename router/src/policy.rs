//! Placement policy: sans-IO, a plain function of the workers' state, so the live router and
//! the simulator run the same code. Today: the lane's pool first, least-loaded ready worker
//! serving the model; spill to the other pool when the lane's pool has none.

use switchyard_cluster::Pool;
use switchyard_proto::v1::Lane;

/// What the policy knows of one worker.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerState {
    pub id: String,
    pub pool: Pool,
    pub models: Vec<String>,
    /// Registered as ready (not draining) and its link is up.
    pub available: bool,
    /// Requests on the worker: active + queued, plus ones sent since its last load report.
    pub outstanding: u32,
    pub max_concurrent: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub worker_id: String,
    pub pool: Pool,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("model {0:?} is not served by any worker")]
    UnknownModel(String),
    #[error("no worker serving model {0:?} is available")]
    NoWorker(String),
}

/// The pool a lane prefers.
pub fn home_pool(lane: Lane) -> Pool {
    match lane {
        Lane::LatencyCritical => Pool::Wse,
        Lane::CostSensitive | Lane::Unspecified => Pool::Gpu,
    }
}

/// Places a request for `model` in `lane`, never on a worker listed in `exclude`.
pub fn place(
    workers: &[WorkerState],
    lane: Lane,
    model: &str,
    exclude: &[String],
) -> Result<Placement, PlacementError> {
    if !workers.iter().any(|w| w.models.iter().any(|m| m == model)) {
        return Err(PlacementError::UnknownModel(model.to_string()));
    }
    let eligible = |pool: Pool| {
        workers.iter().filter(move |w| {
            w.pool == pool
                && w.available
                && w.models.iter().any(|m| m == model)
                && !exclude.contains(&w.id)
        })
    };
    let home = home_pool(lane);
    let other = if home == Pool::Gpu {
        Pool::Wse
    } else {
        Pool::Gpu
    };
    if let Some(w) = least_loaded(eligible(home)) {
        return Ok(Placement {
            worker_id: w.id.clone(),
            pool: w.pool,
            reason: format!("pool={home}"),
        });
    }
    if let Some(w) = least_loaded(eligible(other)) {
        return Ok(Placement {
            worker_id: w.id.clone(),
            pool: w.pool,
            reason: format!("spill={other} (no available {home} worker)"),
        });
    }
    Err(PlacementError::NoWorker(model.to_string()))
}

/// The worker with the lowest utilisation (outstanding / capacity); ties go to fewer
/// outstanding requests, then to the smaller id so the choice is deterministic.
pub fn least_loaded<'a>(workers: impl Iterator<Item = &'a WorkerState>) -> Option<&'a WorkerState> {
    workers.min_by(|a, b| {
        let util = |w: &WorkerState| f64::from(w.outstanding) / f64::from(w.max_concurrent.max(1));
        util(a)
            .total_cmp(&util(b))
            .then(a.outstanding.cmp(&b.outstanding))
            .then(a.id.cmp(&b.id))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn worker(id: &str, pool: Pool, outstanding: u32, max: u32) -> WorkerState {
        WorkerState {
            id: id.into(),
            pool,
            models: vec!["m".into()],
            available: true,
            outstanding,
            max_concurrent: max,
        }
    }

    #[test]
    fn picks_the_least_utilised_worker_of_the_home_pool() {
        let workers = vec![
            worker("g1", Pool::Gpu, 3, 4),
            worker("g2", Pool::Gpu, 4, 16),
            worker("w1", Pool::Wse, 0, 4),
        ];
        let p = place(&workers, Lane::CostSensitive, "m", &[]).unwrap();
        assert_eq!((p.worker_id.as_str(), p.pool), ("g2", Pool::Gpu));
        let p = place(&workers, Lane::LatencyCritical, "m", &[]).unwrap();
        assert_eq!((p.worker_id.as_str(), p.pool), ("w1", Pool::Wse));
    }

    #[test]
    fn spills_to_the_other_pool_and_says_so() {
        let mut workers = vec![worker("g1", Pool::Gpu, 0, 4), worker("w1", Pool::Wse, 0, 4)];
        workers[1].available = false;
        let p = place(&workers, Lane::LatencyCritical, "m", &[]).unwrap();
        assert_eq!(p.worker_id, "g1");
        assert!(p.reason.starts_with("spill=gpu"));
    }

    #[test]
    fn distinguishes_unknown_models_from_unavailable_ones() {
        let mut workers = vec![worker("g1", Pool::Gpu, 0, 4)];
        assert_eq!(
            place(&workers, Lane::CostSensitive, "x", &[]),
            Err(PlacementError::UnknownModel("x".into()))
        );
        workers[0].available = false;
        assert_eq!(
            place(&workers, Lane::CostSensitive, "m", &[]),
            Err(PlacementError::NoWorker("m".into()))
        );
        workers[0].available = true;
        assert_eq!(
            place(&workers, Lane::CostSensitive, "m", &["g1".into()]),
            Err(PlacementError::NoWorker("m".into()))
        );
    }

    fn arb_worker() -> impl Strategy<Value = WorkerState> {
        (
            0u8..20,
            any::<bool>(),
            any::<bool>(),
            0u32..50,
            1u32..32,
            any::<bool>(),
        )
            .prop_map(
                |(id, wse, available, outstanding, max, serves)| WorkerState {
                    id: format!("w{id}"),
                    pool: if wse { Pool::Wse } else { Pool::Gpu },
                    models: if serves {
                        vec!["m".into()]
                    } else {
                        vec!["other".into()]
                    },
                    available,
                    outstanding,
                    max_concurrent: max,
                },
            )
    }

    proptest! {
        #[test]
        fn never_places_on_an_unavailable_excluded_or_wrong_model_worker(
            workers in proptest::collection::vec(arb_worker(), 0..12),
            exclude in proptest::collection::vec(0u8..20, 0..4),
            latency in any::<bool>(),
        ) {
            let exclude: Vec<String> = exclude.iter().map(|i| format!("w{i}")).collect();
            let lane = if latency { Lane::LatencyCritical } else { Lane::CostSensitive };
            if let Ok(p) = place(&workers, lane, "m", &exclude) {
                let chosen: Vec<_> = workers.iter().filter(|w| w.id == p.worker_id && w.pool == p.pool).collect();
                prop_assert!(chosen.iter().any(|w| w.available && w.models.contains(&"m".to_string())));
                prop_assert!(!exclude.contains(&p.worker_id));
                // Least loaded within the chosen pool.
                let util = |w: &WorkerState| f64::from(w.outstanding) / f64::from(w.max_concurrent);
                let best = chosen.iter().map(|w| util(w)).fold(f64::INFINITY, f64::min);
                for w in workers.iter().filter(|w| w.pool == p.pool && w.available && w.models.contains(&"m".to_string()) && !exclude.contains(&w.id)) {
                    prop_assert!(util(w) >= best);
                }
                // The home pool is used whenever it has an eligible worker.
                let home_has = workers.iter().any(|w| w.pool == home_pool(lane) && w.available && w.models.contains(&"m".to_string()) && !exclude.contains(&w.id));
                prop_assert_eq!(p.pool == home_pool(lane), home_has);
            }
        }
    }
}
