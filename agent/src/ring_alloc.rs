//! Allocation of Maglev rings inside the shared ring storage (`RINGS`). A changed ring is
//! written into a fresh region and switched in with one VIP-map update, so the datapath
//! never sees a half-written ring; the old region is freed after the switch.

/// First-fit allocator of `[start, start + len)` regions with coalescing frees.
#[derive(Debug, Clone)]
pub struct RingAllocator {
    capacity: u32,
    /// Free regions, sorted by start, never adjacent (merged on free).
    free: Vec<(u32, u32)>,
}

impl RingAllocator {
    pub fn new(capacity: u32) -> Self {
        Self {
            capacity,
            free: vec![(0, capacity)],
        }
    }

    /// Rebuilds the free list from the regions in use (adopting a running datapath).
    /// Returns None if the regions overlap or exceed the capacity.
    pub fn from_used(capacity: u32, used: &[(u32, u32)]) -> Option<Self> {
        let mut used: Vec<(u32, u32)> = used.iter().copied().filter(|r| r.1 > 0).collect();
        used.sort_unstable();
        let mut free = Vec::new();
        let mut pos = 0u32;
        for (start, len) in used {
            let end = start.checked_add(len)?;
            if start < pos || end > capacity {
                return None;
            }
            if start > pos {
                free.push((pos, start - pos));
            }
            pos = end;
        }
        if pos < capacity {
            free.push((pos, capacity - pos));
        }
        Some(Self { capacity, free })
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn free_entries(&self) -> u64 {
        self.free.iter().map(|r| r.1 as u64).sum()
    }

    pub fn alloc(&mut self, len: u32) -> Option<u32> {
        let i = self.free.iter().position(|r| r.1 >= len)?;
        let (start, flen) = self.free[i];
        if flen == len {
            self.free.remove(i);
        } else {
            self.free[i] = (start + len, flen - len);
        }
        Some(start)
    }

    pub fn free(&mut self, start: u32, len: u32) {
        if len == 0 {
            return;
        }
        let i = self.free.partition_point(|r| r.0 < start);
        debug_assert!(
            i == 0 || self.free[i - 1].0 + self.free[i - 1].1 <= start,
            "double free"
        );
        self.free.insert(i, (start, len));
        // Merge with the next, then with the previous region.
        if i + 1 < self.free.len() && start + len == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == start {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_coalesces_back_to_one_region() {
        let mut a = RingAllocator::new(100);
        let x = a.alloc(30).unwrap();
        let y = a.alloc(30).unwrap();
        let z = a.alloc(40).unwrap();
        assert_eq!((x, y, z), (0, 30, 60));
        assert_eq!(a.alloc(1), None);
        a.free(y, 30);
        a.free(x, 30);
        a.free(z, 40);
        assert_eq!(a.free, vec![(0, 100)]);
    }

    #[test]
    fn first_fit_reuses_holes() {
        let mut a = RingAllocator::new(100);
        let x = a.alloc(10).unwrap();
        let _y = a.alloc(10).unwrap();
        a.free(x, 10);
        assert_eq!(a.alloc(20), Some(20));
        assert_eq!(a.alloc(10), Some(0));
        assert_eq!(a.free_entries(), 60);
    }

    #[test]
    fn rebuild_from_used_regions() {
        let a = RingAllocator::from_used(100, &[(50, 10), (0, 10)]).unwrap();
        assert_eq!(a.free, vec![(10, 40), (60, 40)]);
        assert!(RingAllocator::from_used(100, &[(0, 10), (5, 10)]).is_none());
        assert!(RingAllocator::from_used(100, &[(95, 10)]).is_none());
    }
}
