//! Exact sets of IP addresses as sorted, disjoint, inclusive intervals, one list per
//! family, with the operations egress rendering needs: union, intersection,
//! difference and the smallest list of CIDRs covering a set.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Inclusive `[start, end]` over the address as an integer.
type Interval = (u128, u128);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpSet {
    v4: Vec<Interval>,
    v6: Vec<Interval>,
}

fn cidr_interval(net: &IpNet) -> (bool, Interval) {
    match net {
        IpNet::V4(n) => (
            false,
            (u32::from(n.network()) as u128, u32::from(n.broadcast()) as u128),
        ),
        IpNet::V6(n) => (true, (u128::from(n.network()), u128::from(n.broadcast()))),
    }
}

/// Sorts and merges overlapping or touching intervals.
fn normalize(mut list: Vec<Interval>) -> Vec<Interval> {
    list.sort_unstable();
    let mut out: Vec<Interval> = Vec::with_capacity(list.len());
    for (start, end) in list {
        match out.last_mut() {
            Some(last) if last.1 == u128::MAX || start <= last.1 + 1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

fn intersect(a: &[Interval], b: &[Interval]) -> Vec<Interval> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let start = a[i].0.max(b[j].0);
        let end = a[i].1.min(b[j].1);
        if start <= end {
            out.push((start, end));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

fn subtract(a: &[Interval], b: &[Interval]) -> Vec<Interval> {
    let mut out = Vec::new();
    for &(start, end) in a {
        let mut cursor = Some(start);
        for &(bs, be) in b {
            let Some(from) = cursor else { break };
            if be < from || bs > end {
                continue;
            }
            if bs > from {
                out.push((from, bs - 1));
            }
            cursor = if be >= end { None } else { Some(be + 1) };
        }
        if let Some(from) = cursor {
            out.push((from, end));
        }
    }
    out
}

/// The fewest CIDR blocks whose union is exactly the interval list (`bits` is 32
/// or 128): at each step the largest aligned block that starts there and fits.
fn to_blocks(list: &[Interval], bits: u32) -> Vec<(u128, u8)> {
    let mut out = Vec::new();
    for &(start, end) in list {
        let mut at = start;
        loop {
            // Largest power-of-two size that `at` is aligned to and that fits.
            let align = if at == 0 {
                bits
            } else {
                at.trailing_zeros().min(bits)
            };
            let mut size_log = align;
            while size_log > 0 {
                let last = if size_log == 128 {
                    u128::MAX
                } else {
                    at + ((1u128 << size_log) - 1)
                };
                if last <= end {
                    break;
                }
                size_log -= 1;
            }
            out.push((at, (bits - size_log) as u8));
            let last = if size_log == 128 {
                u128::MAX
            } else {
                at + ((1u128 << size_log) - 1)
            };
            if last >= end {
                break;
            }
            at = last + 1;
        }
    }
    out
}

impl IpSet {
    pub fn from_net(net: &IpNet) -> Self {
        let (v6, interval) = cidr_interval(net);
        let mut set = Self::default();
        if v6 {
            set.v6.push(interval);
        } else {
            set.v4.push(interval);
        }
        set
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    pub fn union(&self, other: &Self) -> Self {
        Self {
            v4: normalize(self.v4.iter().chain(&other.v4).copied().collect()),
            v6: normalize(self.v6.iter().chain(&other.v6).copied().collect()),
        }
    }

    pub fn intersection(&self, other: &Self) -> Self {
        Self {
            v4: intersect(&self.v4, &other.v4),
            v6: intersect(&self.v6, &other.v6),
        }
    }

    pub fn difference(&self, other: &Self) -> Self {
        Self {
            v4: subtract(&self.v4, &other.v4),
            v6: subtract(&self.v6, &other.v6),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (list, value) = match ip {
            IpAddr::V4(a) => (&self.v4, u32::from(a) as u128),
            IpAddr::V6(a) => (&self.v6, u128::from(a)),
        };
        list.iter().any(|&(s, e)| s <= value && value <= e)
    }

    /// The set as the fewest CIDRs, IPv4 first.
    pub fn to_cidrs(&self) -> Vec<IpNet> {
        let v4 = to_blocks(&self.v4, 32).into_iter().filter_map(|(addr, prefix)| {
            let addr = Ipv4Addr::from(u32::try_from(addr).ok()?);
            Ipv4Net::new(addr, prefix).ok().map(IpNet::V4)
        });
        let v6 = to_blocks(&self.v6, 128)
            .into_iter()
            .filter_map(|(addr, prefix)| Ipv6Net::new(Ipv6Addr::from(addr), prefix).ok().map(IpNet::V6));
        v4.chain(v6).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test CIDR")
    }
    fn set(cidrs: &[&str]) -> IpSet {
        cidrs
            .iter()
            .fold(IpSet::default(), |acc, c| acc.union(&IpSet::from_net(&net(c))))
    }
    fn strings(set: &IpSet) -> Vec<String> {
        set.to_cidrs().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn difference_splits_into_aligned_blocks() {
        let rest = set(&["10.0.0.0/8"]).difference(&set(&["10.1.2.3/32"]));
        let cidrs = strings(&rest);
        assert_eq!(
            cidrs.len(),
            24,
            "one block per bit below /8 except the removed one: {cidrs:?}"
        );
        assert!(!rest.contains("10.1.2.3".parse().expect("ip")));
        assert!(rest.contains("10.1.2.2".parse().expect("ip")));
        assert!(rest.contains("10.255.255.255".parse().expect("ip")));
        // Re-assembling the blocks gives back the same set.
        let again = rest
            .to_cidrs()
            .iter()
            .fold(IpSet::default(), |a, n| a.union(&IpSet::from_net(n)));
        assert_eq!(again, rest);
    }

    #[test]
    fn whole_address_spaces_do_not_overflow() {
        let all = set(&["0.0.0.0/0", "::/0"]);
        assert_eq!(strings(&all), vec!["0.0.0.0/0", "::/0"]);
        let minus = all.difference(&set(&["::/1", "128.0.0.0/1"]));
        assert_eq!(strings(&minus), vec!["0.0.0.0/1", "8000::/1"]);
        assert_eq!(
            strings(&set(&["::/1", "8000::/1"])),
            vec!["::/0"],
            "touching halves merge"
        );
        assert!(
            all.intersection(&set(&["fd00::/8"]))
                .contains("fd00::1".parse().expect("ip"))
        );
    }

    #[test]
    fn families_never_mix() {
        let v4 = set(&["10.0.0.0/8"]);
        let v6 = set(&["::ffff:0:0/96"]);
        assert!(v4.intersection(&v6).is_empty());
        assert_eq!(v4.difference(&v6), v4);
    }
}
