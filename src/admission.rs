//! Admission: whether this node has room for one more environment, and the
//! ledger of what it has promised. Pure arithmetic, no I/O: the caller holds
//! the ledger behind one lock and checks-and-reserves in one step, so two
//! concurrent requests can never both take the last slot.
//!
//! AIO rule. Linux AIO contexts (`fs.aio-max-nr`) are shared by the host and
//! every container, and the kernel only reports the total in use
//! (`fs.aio-nr`). What others use is estimated as `in_use` minus what our
//! *started* environments may be using (at most their reservations), never
//! below zero; a new reservation fits when
//! `committed + request <= max - others`. An environment that uses less than
//! it reserved only makes the estimate of others larger, so the rule errs on
//! the side of refusing.

use std::collections::BTreeMap;

/// What this node can give, as measured now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Bytes of memory environments may take in all.
    pub memory_allocatable: u64,
    pub max_envs: u32,
    /// `fs.aio-max-nr`.
    pub aio_max: u64,
    /// `fs.aio-nr`: contexts in use on the whole host.
    pub aio_in_use: u64,
}

/// What one environment holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub memory: u64,
    pub aio: u64,
    /// Its container has started (so it may be using its AIO contexts).
    pub started: bool,
}

/// The resource a refused request was short of.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Shortage {
    #[error("memory: needs {need} bytes, {free} of {allocatable} allocatable are free")]
    Memory {
        need: u64,
        free: u64,
        allocatable: u64,
    },
    #[error("max_envs: all {max} environment slots are taken")]
    Envs { max: u32 },
    #[error("aio: needs {need} AIO contexts, {free} are free (fs.aio-max-nr {max})")]
    Aio { need: u64, free: u64, max: u64 },
}

impl Shortage {
    /// The resource's name, as the API's `resource` field gives it.
    pub fn resource(&self) -> &'static str {
        match self {
            Shortage::Memory { .. } => "memory",
            Shortage::Envs { .. } => "max_envs",
            Shortage::Aio { .. } => "aio",
        }
    }
}

/// Totals of a ledger.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    pub memory: u64,
    pub aio: u64,
    /// AIO reserved by environments whose containers have started.
    pub aio_started: u64,
    pub envs: u32,
}

/// Everything this node has promised, by environment id.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    entries: BTreeMap<String, Reservation>,
}

impl Ledger {
    pub fn committed(&self) -> Committed {
        let mut c = Committed::default();
        for r in self.entries.values() {
            // Saturating: restored reservations come from container labels.
            c.memory = c.memory.saturating_add(r.memory);
            c.aio = c.aio.saturating_add(r.aio);
            if r.started {
                c.aio_started = c.aio_started.saturating_add(r.aio);
            }
            c.envs = c.envs.saturating_add(1);
        }
        c
    }

    /// AIO contexts free for a new reservation (see the module header).
    pub fn aio_free(&self, cap: &Capacity) -> u64 {
        let c = self.committed();
        let others = cap.aio_in_use.saturating_sub(c.aio_started);
        cap.aio_max.saturating_sub(others).saturating_sub(c.aio)
    }

    /// Memory free for a new reservation.
    pub fn memory_free(&self, cap: &Capacity) -> u64 {
        cap.memory_allocatable
            .saturating_sub(self.committed().memory)
    }

    /// Checks whether `memory` and `aio` fit, without reserving.
    pub fn check(&self, memory: u64, aio: u64, cap: &Capacity) -> Result<(), Shortage> {
        let c = self.committed();
        if c.envs >= cap.max_envs {
            return Err(Shortage::Envs { max: cap.max_envs });
        }
        let free = self.memory_free(cap);
        if memory > free {
            return Err(Shortage::Memory {
                need: memory,
                free,
                allocatable: cap.memory_allocatable,
            });
        }
        let free = self.aio_free(cap);
        if aio > free {
            return Err(Shortage::Aio {
                need: aio,
                free,
                max: cap.aio_max,
            });
        }
        Ok(())
    }

    /// Checks and reserves in one step. Reserving an id twice replaces the
    /// first reservation.
    pub fn reserve(
        &mut self,
        id: &str,
        memory: u64,
        aio: u64,
        cap: &Capacity,
    ) -> Result<(), Shortage> {
        self.entries.remove(id);
        self.check(memory, aio, cap)?;
        self.entries.insert(
            id.to_string(),
            Reservation {
                memory,
                aio,
                started: false,
            },
        );
        Ok(())
    }

    /// Records a reservation without checking: for environments found
    /// running at start-up, which hold their room whatever the limits say now.
    pub fn restore(&mut self, id: &str, r: Reservation) {
        self.entries.insert(id.to_string(), r);
    }

    pub fn mark_started(&mut self, id: &str) {
        if let Some(r) = self.entries.get_mut(id) {
            r.started = true;
        }
    }

    pub fn release(&mut self, id: &str) -> Option<Reservation> {
        self.entries.remove(id)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.entries.contains_key(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn cap() -> Capacity {
        Capacity {
            memory_allocatable: 256 * GIB,
            max_envs: 8,
            aio_max: 65536,
            aio_in_use: 0,
        }
    }

    #[test]
    fn eight_32g_envs_fill_a_256g_box() {
        let mut l = Ledger::default();
        for i in 0..8 {
            l.reserve(&format!("e{i}"), 32 * GIB, 0, &cap()).unwrap();
        }
        let mut c = cap();
        c.max_envs = 9;
        let err = l.reserve("e9", 32 * GIB, 0, &c).unwrap_err();
        assert_eq!(err.resource(), "memory");
        assert_eq!(
            l.reserve("e9", GIB, 0, &cap()).unwrap_err(),
            Shortage::Envs { max: 8 }
        );
        l.release("e3");
        l.reserve("e9", 32 * GIB, 0, &cap()).unwrap();
    }

    #[test]
    fn third_database_needs_aio_headroom() {
        // The seed's failure: two databases use most of the default 65536.
        let mut l = Ledger::default();
        l.reserve("db1", GIB, 30000, &cap()).unwrap();
        l.reserve("db2", GIB, 30000, &cap()).unwrap();
        let err = l.reserve("db3", GIB, 30000, &cap()).unwrap_err();
        assert_eq!(
            err,
            Shortage::Aio {
                need: 30000,
                free: 5536,
                max: 65536
            }
        );
        // Raised the way the seed did: fs.aio-max-nr = 1048576.
        let mut raised = cap();
        raised.aio_max = 1_048_576;
        l.reserve("db3", GIB, 30000, &raised).unwrap();
    }

    #[test]
    fn aio_in_use_by_others_counts_but_ours_not_twice() {
        let mut l = Ledger::default();
        let mut c = cap();
        l.reserve("a", GIB, 20000, &c).unwrap();
        l.mark_started("a");
        // The host now reports our 20000 plus 10000 of someone else.
        c.aio_in_use = 30000;
        assert_eq!(l.aio_free(&c), 65536 - 10000 - 20000);
        // A loading environment has not started using its contexts: the
        // whole in-use figure belongs to others.
        l.reserve("b", GIB, 5000, &c).unwrap();
        assert_eq!(l.aio_free(&c), 65536 - 10000 - 25000);
    }

    proptest! {
        #[test]
        fn never_overcommits(ops in proptest::collection::vec((0u8..3, 0u64..64, 0u64..40000), 1..200)) {
            let c = cap();
            let mut l = Ledger::default();
            for (i, (op, mem, aio)) in ops.into_iter().enumerate() {
                let id = format!("e{}", i % 12);
                match op {
                    0 | 1 => { let _ = l.reserve(&id, mem * GIB, aio, &c); }
                    _ => { l.release(&id); }
                }
                let t = l.committed();
                prop_assert!(t.memory <= c.memory_allocatable);
                prop_assert!(t.envs <= c.max_envs);
                prop_assert!(t.aio <= c.aio_max);
            }
        }
    }
}
