//! One shard's entries: a slab of nodes, each on the recency list of its
//! [`Region`] (an intrusive doubly-linked list through `u32` slot indices),
//! and one hash index from key to slot.
//!
//! The index is keyed by the `u64` the shard already has for every key
//! ([`hash_key`](crate::hash::hash_key)), stored in the node so that nothing
//! is hashed twice; it compares keys through the slab. A lookup is one probe
//! whatever the region, moving an entry between regions is an unlink and a
//! relink (no index traffic, no allocation), and a freed slot is reused by
//! the next insert.

use std::fmt;

use hashbrown::HashTable;

use crate::policy::{Entry, Region};

/// The end of a list, or of the free list.
const NIL: u32 = u32::MAX;

/// A stored entry and its links on its region's list.
struct Node<K, V> {
    key: K,
    entry: Entry<V>,
    /// `hash_key(&key)`, as the index is keyed.
    hash: u64,
    /// Towards the most recently used end.
    prev: u32,
    /// Towards the least recently used end.
    next: u32,
    region: Region,
}

enum Slot<K, V> {
    Occupied(Node<K, V>),
    Vacant { next_free: u32 },
}

/// One region's recency list: `head` most recently used, `tail` least.
#[derive(Debug, Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
    len: usize,
}

impl List {
    const EMPTY: Self = Self {
        head: NIL,
        tail: NIL,
        len: 0,
    };
}

/// The slab, the three recency lists and the index. Slot indices stay
/// valid while their entry is stored (moves between regions keep them).
pub(crate) struct Store<K, V> {
    slots: Vec<Slot<K, V>>,
    /// First vacant slot (the most recently freed), or [`NIL`].
    free: u32,
    index: HashTable<u32>,
    lists: [List; 3],
}

impl<K, V> fmt::Debug for Store<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("window", &self.lists[Region::Window as usize].len)
            .field("probation", &self.lists[Region::Probation as usize].len)
            .field("protected", &self.lists[Region::Protected as usize].len)
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl<K, V> Default for Store<K, V> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            free: NIL,
            index: HashTable::new(),
            lists: [List::EMPTY; 3],
        }
    }
}

#[inline]
fn node<K, V>(slots: &[Slot<K, V>], i: u32) -> &Node<K, V> {
    match &slots[i as usize] {
        Slot::Occupied(n) => n,
        Slot::Vacant { .. } => unreachable!("slot {i} is linked or indexed but vacant"),
    }
}

impl<K: Eq, V> Store<K, V> {
    #[inline]
    fn node(&self, i: u32) -> &Node<K, V> {
        node(&self.slots, i)
    }

    #[inline]
    fn node_mut(&mut self, i: u32) -> &mut Node<K, V> {
        match &mut self.slots[i as usize] {
            Slot::Occupied(n) => n,
            Slot::Vacant { .. } => unreachable!("slot {i} is linked or indexed but vacant"),
        }
    }

    /// Entries stored, in all regions.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// Entries stored in `r`.
    #[inline]
    pub(crate) fn region_len(&self, r: Region) -> usize {
        self.lists[r as usize].len
    }

    /// The slot holding `key`, whose `hash_key` is `hash`.
    #[inline]
    pub(crate) fn find(&self, hash: u64, key: &K) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(hash, |&i| node(slots, i).key == *key)
            .copied()
    }

    /// The region of the entry in slot `i`.
    #[inline]
    pub(crate) fn region(&self, i: u32) -> Region {
        self.node(i).region
    }

    /// Whether slot `i` holds an entry, in region `r`.
    #[inline]
    pub(crate) fn holds_in(&self, i: u32, r: Region) -> bool {
        matches!(self.slots.get(i as usize), Some(Slot::Occupied(n)) if n.region == r)
    }

    /// The entry in slot `i`.
    #[inline]
    pub(crate) fn entry(&self, i: u32) -> &Entry<V> {
        &self.node(i).entry
    }

    /// The hash of the key in slot `i`.
    #[inline]
    pub(crate) fn hash(&self, i: u32) -> u64 {
        self.node(i).hash
    }

    /// The least recently used entry of `r`.
    #[inline]
    pub(crate) fn lru(&self, r: Region) -> Option<u32> {
        let t = self.lists[r as usize].tail;
        (t != NIL).then_some(t)
    }

    /// The slots of `r`, most recently used first.
    pub(crate) fn iter(&self, r: Region) -> impl Iterator<Item = (u32, &K, &Entry<V>)> + '_ {
        let mut at = self.lists[r as usize].head;
        std::iter::from_fn(move || {
            if at == NIL {
                return None;
            }
            let i = at;
            let n = self.node(i);
            at = n.next;
            Some((i, &n.key, &n.entry))
        })
    }

    /// Stores `key` (not stored yet) with `entry` as the most recently used
    /// entry of `r`; its slot.
    pub(crate) fn push(&mut self, r: Region, key: K, hash: u64, entry: Entry<V>) -> u32 {
        let new = Node {
            key,
            entry,
            hash,
            prev: NIL,
            next: NIL,
            region: r,
        };
        let i = if self.free != NIL {
            let i = self.free;
            let Slot::Vacant { next_free } = self.slots[i as usize] else {
                unreachable!("the free list holds an occupied slot {i}");
            };
            self.free = next_free;
            self.slots[i as usize] = Slot::Occupied(new);
            i
        } else {
            let i = u32::try_from(self.slots.len())
                .ok()
                .filter(|&i| i != NIL)
                .expect("a shard holds fewer than 2^32 - 1 entries");
            self.slots.push(Slot::Occupied(new));
            i
        };
        let slots = &self.slots;
        self.index.insert_unique(hash, i, |&j| node(slots, j).hash);
        self.link_front(i, r);
        i
    }

    /// Removes the entry in slot `i`; the slot is free for reuse.
    pub(crate) fn remove(&mut self, i: u32) -> (K, Entry<V>) {
        self.unlink(i);
        let hash = self.node(i).hash;
        match self.index.find_entry(hash, |&j| j == i) {
            Ok(e) => {
                e.remove();
            }
            Err(_) => unreachable!("slot {i} is stored but not indexed"),
        }
        let slot = std::mem::replace(
            &mut self.slots[i as usize],
            Slot::Vacant {
                next_free: self.free,
            },
        );
        self.free = i;
        match slot {
            Slot::Occupied(n) => (n.key, n.entry),
            Slot::Vacant { .. } => unreachable!("slot {i} was removed twice"),
        }
    }

    /// Replaces the key and entry in slot `i` (an equal key) and makes it the
    /// most recently used of its region; the old key and entry.
    pub(crate) fn replace(&mut self, i: u32, key: K, entry: Entry<V>) -> (K, Entry<V>) {
        let n = self.node_mut(i);
        let old = (
            std::mem::replace(&mut n.key, key),
            std::mem::replace(&mut n.entry, entry),
        );
        let r = n.region;
        self.move_to_front(i, r);
        old
    }

    /// Makes slot `i` the most recently used entry of `r` (its own region or
    /// another).
    #[inline]
    pub(crate) fn move_to_front(&mut self, i: u32, r: Region) {
        let n = self.node(i);
        if n.region == r && n.prev == NIL {
            return;
        }
        self.unlink(i);
        self.link_front(i, r);
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next, r) = {
            let n = self.node(i);
            (n.prev, n.next, n.region as usize)
        };
        if prev == NIL {
            self.lists[r].head = next;
        } else {
            self.node_mut(prev).next = next;
        }
        if next == NIL {
            self.lists[r].tail = prev;
        } else {
            self.node_mut(next).prev = prev;
        }
        self.lists[r].len -= 1;
    }

    fn link_front(&mut self, i: u32, r: Region) {
        let list = &mut self.lists[r as usize];
        let head = list.head;
        list.head = i;
        if head == NIL {
            list.tail = i;
        }
        list.len += 1;
        let n = self.node_mut(i);
        n.prev = NIL;
        n.next = head;
        n.region = r;
        if head != NIL {
            self.node_mut(head).prev = i;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lru::LruCache;
    use proptest::prelude::*;

    use super::*;
    use crate::hash::hash_key;

    const REGIONS: [Region; 3] = [Region::Window, Region::Probation, Region::Protected];

    fn entry(value: u32) -> Entry<u32> {
        Entry {
            value,
            weight: 1,
            expires_at: None,
            tags: Vec::new(),
            load_time: Duration::ZERO,
        }
    }

    /// The storage the store replaced: one `LruCache` per region.
    #[derive(Default)]
    struct Reference {
        lists: [Option<LruCache<u16, u32>>; 3],
    }

    impl Reference {
        fn list(&mut self, r: Region) -> &mut LruCache<u16, u32> {
            self.lists[r as usize].get_or_insert_with(LruCache::unbounded)
        }

        fn locate(&mut self, k: u16) -> Option<Region> {
            REGIONS.into_iter().find(|&r| self.list(r).contains(&k))
        }

        fn order(&mut self, r: Region) -> Vec<(u16, u32)> {
            self.list(r).iter().map(|(k, v)| (*k, *v)).collect()
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Insert (or replace in its region) in a region.
        Put(u16, u8, u32),
        /// Access: most recently used of its region.
        Touch(u16),
        /// Move to another region's most recently used end.
        Move(u16, u8),
        Remove(u16),
        /// Remove a region's least recently used entry.
        PopLru(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        let key = 0u16..48;
        let region = 0u8..3;
        prop_oneof![
            4 => (key.clone(), region.clone(), any::<u32>()).prop_map(|(k, r, v)| Op::Put(k, r, v)),
            3 => key.clone().prop_map(Op::Touch),
            2 => (key.clone(), region.clone()).prop_map(|(k, r)| Op::Move(k, r)),
            2 => key.prop_map(Op::Remove),
            2 => region.prop_map(Op::PopLru),
        ]
    }

    fn check(store: &Store<u16, u32>, reference: &mut Reference) {
        let mut total = 0;
        for r in REGIONS {
            let ours: Vec<(u16, u32)> = store.iter(r).map(|(_, k, e)| (*k, e.value)).collect();
            let theirs = reference.order(r);
            assert_eq!(ours, theirs, "{r:?}");
            assert_eq!(store.region_len(r), theirs.len());
            let lru = store.lru(r).map(|i| ours_key(store, i));
            assert_eq!(lru, theirs.last().map(|(k, _)| *k), "{r:?}");
            for (i, k, _) in store.iter(r) {
                assert_eq!(store.find(hash_key(k), k), Some(i));
                assert_eq!(store.region(i), r);
                assert!(store.holds_in(i, r));
            }
            total += theirs.len();
        }
        assert_eq!(store.len(), total);
        for k in 0..48u16 {
            let ours = store.find(hash_key(&k), &k).map(|i| store.region(i));
            assert_eq!(ours, reference.locate(k), "key {k}");
        }
    }

    fn ours_key(store: &Store<u16, u32>, i: u32) -> u16 {
        store
            .iter(store.region(i))
            .find(|(j, _, _)| *j == i)
            .map(|(_, k, _)| *k)
            .expect("slot on its list")
    }

    fn run(ops: &[Op]) {
        let mut store: Store<u16, u32> = Store::default();
        let mut reference = Reference::default();
        for op in ops {
            match *op {
                Op::Put(k, r, v) => {
                    let r = REGIONS[r as usize];
                    let h = hash_key(&k);
                    match (store.find(h, &k), reference.locate(k)) {
                        (Some(i), Some(theirs)) => {
                            // A replacement stays in its region.
                            let (old_k, old) = store.replace(i, k, entry(v));
                            let old_theirs = reference.list(theirs).pop(&k);
                            reference.list(theirs).push(k, v);
                            assert_eq!((old_k, Some(old.value)), (k, old_theirs));
                        }
                        (None, None) => {
                            store.push(r, k, h, entry(v));
                            reference.list(r).push(k, v);
                        }
                        other => panic!("located differently: {other:?}"),
                    }
                }
                Op::Touch(k) => {
                    if let Some(i) = store.find(hash_key(&k), &k) {
                        let r = store.region(i);
                        store.move_to_front(i, r);
                        assert!(reference.list(r).get(&k).is_some());
                    } else {
                        assert_eq!(reference.locate(k), None);
                    }
                }
                Op::Move(k, to) => {
                    let to = REGIONS[to as usize];
                    if let Some(i) = store.find(hash_key(&k), &k) {
                        let from = store.region(i);
                        store.move_to_front(i, to);
                        let (k, v) = reference.list(from).pop_entry(&k).expect("stored");
                        reference.list(to).push(k, v);
                    }
                }
                Op::Remove(k) => {
                    let ours = store.find(hash_key(&k), &k).map(|i| store.remove(i));
                    let theirs = reference
                        .locate(k)
                        .and_then(|r| reference.list(r).pop_entry(&k));
                    assert_eq!(ours.map(|(k, e)| (k, e.value)), theirs);
                }
                Op::PopLru(r) => {
                    let r = REGIONS[r as usize];
                    let ours = store.lru(r).map(|i| store.remove(i));
                    let theirs = reference.list(r).pop_lru();
                    assert_eq!(ours.map(|(k, e)| (k, e.value)), theirs);
                }
            }
            check(&store, &mut reference);
        }
    }

    #[test]
    fn slots_are_reused_most_recently_freed_first() {
        let mut store: Store<u16, u32> = Store::default();
        let a = store.push(Region::Window, 1, hash_key(&1u16), entry(1));
        let b = store.push(Region::Window, 2, hash_key(&2u16), entry(2));
        store.remove(a);
        store.remove(b);
        assert_eq!(
            store.push(Region::Probation, 3, hash_key(&3u16), entry(3)),
            b
        );
        assert_eq!(
            store.push(Region::Probation, 4, hash_key(&4u16), entry(4)),
            a
        );
        assert!(!store.holds_in(a, Region::Window));
        assert!(store.holds_in(a, Region::Probation));
        assert_eq!(store.len(), 2);
        assert_eq!(store.slots.len(), 2);
    }

    #[test]
    fn a_fixed_sequence_matches_lru_caches() {
        use Op::*;
        run(&[
            Put(1, 0, 10),
            Put(2, 0, 20),
            Put(3, 0, 30),
            Touch(1),
            Move(2, 1),
            Move(3, 1),
            Move(1, 2),
            PopLru(1),
            Put(4, 1, 40),
            Put(3, 2, 31),
            Touch(4),
            Move(4, 1),
            Remove(1),
            PopLru(2),
            Put(5, 2, 50),
            Put(6, 2, 60),
            Move(5, 2),
            Move(6, 0),
            PopLru(0),
            PopLru(0),
        ]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Every operation leaves the same recency orders, the same least
        /// recently used entries and the same lookups as one `LruCache` per
        /// region doing the same.
        #[test]
        fn recency_lists_match_lru_caches(ops in proptest::collection::vec(op(), 1..300)) {
            run(&ops);
        }
    }
}
