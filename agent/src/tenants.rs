//! Each namespace's share of the node's store. The store serves every tenant on the node, so
//! that one namespace could otherwise pin all of it (its volumes' models are never removed to
//! make room) or keep the agent busy with publications. A namespace (the pod's, which the
//! kubelet passes on each mount) may pin at most its share of the store's bytes, counting each
//! model its mounted volumes hold once, and have a bounded number of publications under way;
//! the node as a whole has a bound of its own, for the memory the publications' parsers take.
//! What the agent counts starts with its process: volumes mounted before a restart count again
//! once they are mounted again.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

/// How much of the node one namespace may take.
#[derive(Clone, Copy, Debug)]
pub struct Shares {
    /// The most bytes of models one namespace's mounted volumes may hold.
    pub store_bytes: u64,
    /// Publications one namespace may have under way at once.
    pub publications: usize,
    /// Publications all namespaces together may have under way at once: each holds a parser's
    /// bounded memory in the agent, which is sized for this many.
    pub node_publications: usize,
}

/// A mounted volume: its pod's namespace and the models it holds, with their sizes.
struct Volume {
    namespace: String,
    models: Vec<(String, u64)>,
}

pub struct Tenants {
    shares: Shares,
    volumes: Mutex<HashMap<String, Volume>>,
    publishing: Mutex<HashMap<String, usize>>,
}

/// A publication under way for a namespace, counted until dropped.
pub struct Publishing<'a> {
    tenants: &'a Tenants,
    namespace: String,
}

impl Drop for Publishing<'_> {
    fn drop(&mut self) {
        let mut publishing = self.tenants.publishing.lock().unwrap();
        if let Some(count) = publishing.get_mut(&self.namespace) {
            *count -= 1;
            if *count == 0 {
                publishing.remove(&self.namespace);
            }
        }
    }
}

impl Tenants {
    pub fn new(shares: Shares) -> Self {
        Tenants {
            shares,
            volumes: Mutex::new(HashMap::new()),
            publishing: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a publication for `namespace`, or says why it must wait (the kubelet retries a
    /// mount that fails).
    pub fn start_publication(&self, namespace: &str) -> Result<Publishing<'_>, String> {
        let mut publishing = self.publishing.lock().unwrap();
        let all: usize = publishing.values().sum();
        if all >= self.shares.node_publications {
            return Err(format!(
                "this node's agent has {all} publications under way, the most it runs at once \
                 (the chart's nodeStore.maxPublications); the mount is tried again"
            ));
        }
        let count = publishing.entry(namespace.to_owned()).or_default();
        if *count >= self.shares.publications {
            return Err(format!(
                "namespace {namespace:?} has {count} publications under way on this node, its \
                 share (the chart's nodeStore.namespacePublications); the mount is tried again"
            ));
        }
        *count += 1;
        Ok(Publishing {
            tenants: self,
            namespace: namespace.to_owned(),
        })
    }

    /// Records `volume` of `namespace` holding `models` (digest, bytes), unless its namespace
    /// would then hold more than its share: then the reason, and nothing is recorded.
    pub fn admit(
        &self,
        volume: &str,
        namespace: &str,
        models: Vec<(String, u64)>,
    ) -> Result<(), String> {
        let mut volumes = self.volumes.lock().unwrap();
        let held: BTreeSet<(&str, u64)> = volumes
            .iter()
            .filter(|(id, v)| v.namespace == namespace && id.as_str() != volume)
            .flat_map(|(_, v)| v.models.iter().map(|(d, b)| (d.as_str(), *b)))
            .chain(models.iter().map(|(d, b)| (d.as_str(), *b)))
            .collect();
        let bytes: u64 = held.iter().map(|(_, b)| b).sum();
        if bytes > self.shares.store_bytes {
            return Err(format!(
                "namespace {namespace:?} would hold {bytes} bytes of models in this node's \
                 store, more than its share of {} bytes (the chart's \
                 nodeStore.namespaceSharePercent); the models stay in the store, unused, until \
                 the namespace's other volumes on this node go",
                self.shares.store_bytes
            ));
        }
        volumes.insert(
            volume.to_owned(),
            Volume {
                namespace: namespace.to_owned(),
                models,
            },
        );
        Ok(())
    }

    /// Forgets `volume` (unmounted, or not mounted after all).
    pub fn release(&self, volume: &str) {
        self.volumes.lock().unwrap().remove(volume);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(digest: &str, bytes: u64) -> (String, u64) {
        (digest.to_owned(), bytes)
    }

    #[test]
    fn a_namespace_holds_at_most_its_share_counting_each_model_once() {
        let tenants = Tenants::new(Shares {
            store_bytes: 100,
            publications: 1,
            node_publications: 8,
        });
        tenants.admit("v1", "a", vec![model("m1", 60)]).unwrap();
        // The same model again costs nothing more.
        tenants.admit("v2", "a", vec![model("m1", 60)]).unwrap();
        let refused = tenants.admit("v3", "a", vec![model("m2", 50)]).unwrap_err();
        assert!(
            refused.contains("would hold 110 bytes") && refused.contains("share of 100 bytes"),
            "{refused}"
        );
        // Another namespace has a share of its own.
        tenants
            .admit("v4", "b", vec![model("m2", 50), model("m1", 60)])
            .unwrap_err();
        tenants.admit("v4", "b", vec![model("m2", 50)]).unwrap();
        // Once the first namespace's volumes go, its share is free again.
        tenants.release("v1");
        tenants.release("v2");
        tenants.admit("v3", "a", vec![model("m2", 50)]).unwrap();
    }

    #[test]
    fn publications_under_way_are_bounded_per_namespace_and_on_the_node() {
        let tenants = Tenants::new(Shares {
            store_bytes: 100,
            publications: 2,
            node_publications: 3,
        });
        let first = tenants.start_publication("a").unwrap();
        let _second = tenants.start_publication("a").unwrap();
        let refused = tenants.start_publication("a").err().unwrap();
        assert!(refused.contains("2 publications under way"), "{refused}");
        let _other = tenants.start_publication("b").unwrap();
        // Three namespaces' publications fill the node whatever their shares.
        let refused = tenants.start_publication("c").err().unwrap();
        assert!(
            refused.contains("3 publications under way") && refused.contains("maxPublications"),
            "{refused}"
        );
        drop(first);
        let _third = tenants.start_publication("c").unwrap();
        assert!(tenants.start_publication("a").is_err());
    }
}
