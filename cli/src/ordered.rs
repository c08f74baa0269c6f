//! "Run concurrently, report in the order given" for multi-VM commands.

use std::future::Future;

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;

/// Runs `run(item)` for every item at once and hands each result to `report`
/// in the order of `items`: a result is reported as soon as it and every
/// earlier one are done, so a slow first VM delays the report but not the
/// work. A failure never stops the others. Returns how many failed.
pub async fn run_in_order<I, T, E, Fut>(
    items: &[I],
    run: impl Fn(I) -> Fut,
    mut report: impl FnMut(&I, Result<T, E>),
) -> usize
where
    I: Clone,
    Fut: Future<Output = Result<T, E>>,
{
    let mut pending: FuturesOrdered<_> = items
        .iter()
        .cloned()
        .map(|item| {
            let fut = run(item.clone());
            async move { (item, fut.await) }
        })
        .collect();
    let mut failed = 0;
    while let Some((item, result)) = pending.next().await {
        failed += usize::from(result.is_err());
        report(&item, result);
    }
    failed
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::sync::{Barrier, oneshot};

    use super::*;

    #[tokio::test]
    async fn reports_in_given_order_even_when_later_items_finish_first() {
        let names = ["a", "b", "c"].map(String::from).to_vec();
        // Each future waits for its own release; the test releases c, then b, then a.
        let mut release = HashMap::new();
        let waits: Arc<Mutex<HashMap<String, oneshot::Receiver<()>>>> = Arc::default();
        for n in &names {
            let (tx, rx) = oneshot::channel();
            release.insert(n.clone(), tx);
            waits.lock().unwrap().insert(n.clone(), rx);
        }
        let finished: Arc<Mutex<Vec<String>>> = Arc::default();
        let (fin, w) = (finished.clone(), waits.clone());
        let run = move |n: String| {
            let rx = w.lock().unwrap().remove(&n).unwrap();
            let fin = fin.clone();
            async move {
                rx.await.unwrap();
                fin.lock().unwrap().push(n.clone());
                if n == "b" {
                    Err(format!("{n} failed"))
                } else {
                    Ok(n.to_uppercase())
                }
            }
        };
        let mut reported = Vec::new();
        let work = run_in_order(&names, run, |n, r| reported.push((n.clone(), r)));
        let releaser = async {
            for n in ["c", "b", "a"] {
                release.remove(n).unwrap().send(()).unwrap();
                tokio::task::yield_now().await;
            }
        };
        let (failed, ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(work, releaser)
        })
        .await
        .unwrap();
        assert_eq!(failed, 1);
        assert_eq!(*finished.lock().unwrap(), ["c", "b", "a"]);
        assert_eq!(
            reported,
            [
                ("a".to_string(), Ok("A".to_string())),
                ("b".to_string(), Err("b failed".to_string())),
                ("c".to_string(), Ok("C".to_string())),
            ]
        );
    }

    #[tokio::test]
    async fn runs_all_items_concurrently() {
        // Every future waits until all have started: run one at a time and
        // this deadlocks (caught by the timeout).
        let items: Vec<u32> = (0..5).collect();
        let barrier = Arc::new(Barrier::new(items.len()));
        let mut seen = Vec::new();
        let failed = tokio::time::timeout(
            Duration::from_secs(10),
            run_in_order(
                &items,
                |i| {
                    let b = barrier.clone();
                    async move {
                        b.wait().await;
                        Ok::<_, ()>(i * 10)
                    }
                },
                |i, r| seen.push((*i, r)),
            ),
        )
        .await
        .expect("items did not run concurrently");
        assert_eq!(failed, 0);
        assert_eq!(
            seen,
            [
                (0, Ok(0)),
                (1, Ok(10)),
                (2, Ok(20)),
                (3, Ok(30)),
                (4, Ok(40))
            ]
        );
    }
}
