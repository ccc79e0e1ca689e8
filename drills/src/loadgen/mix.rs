//! The operation mix: `send=80,read=15,topup=5`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// One kind of request of the timed run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// `POST /v1/gifts`.
    Send,
    /// `GET /v1/wallet/{user_id}`.
    Read,
    /// `POST /v1/wallet/{user_id}/topup`.
    Topup,
}

impl Op {
    pub const ALL: [Op; 3] = [Op::Send, Op::Read, Op::Topup];

    pub fn name(self) -> &'static str {
        match self {
            Op::Send => "send",
            Op::Read => "read",
            Op::Topup => "topup",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MixError {
    #[error("the mix is empty; expected e.g. send=80,read=15,topup=5")]
    Empty,
    #[error("`{0}` is not op=weight (e.g. send=80)")]
    NotAPair(String),
    #[error("unknown op `{0}`; the ops are send, read and topup")]
    UnknownOp(String),
    #[error("weight `{weight}` of {op} is not a whole number >= 0")]
    BadWeight { op: String, weight: String },
    #[error("{0} appears more than once in the mix")]
    Duplicate(Op),
    #[error("no op has a positive weight")]
    NoPositiveWeight,
    #[error("the weights add up to more than {}", u32::MAX)]
    TooLarge,
}

/// Relative weights of the ops; an op left out has weight 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    /// In the order of [`Op::ALL`].
    weights: [u32; 3],
    total: u32,
}

impl Mix {
    pub fn new(send: u32, read: u32, topup: u32) -> Result<Mix, MixError> {
        let total = send
            .checked_add(read)
            .and_then(|t| t.checked_add(topup))
            .ok_or(MixError::TooLarge)?;
        if total == 0 {
            return Err(MixError::NoPositiveWeight);
        }
        Ok(Mix {
            weights: [send, read, topup],
            total,
        })
    }

    pub fn weight(&self, op: Op) -> u32 {
        self.weights[op as usize]
    }

    /// The sum of the weights (always > 0).
    pub fn total(&self) -> u32 {
        self.total
    }

    /// The op for a uniform draw `x` in `0..total()`; `x` outside that range clamps to the
    /// last op with a positive weight.
    pub fn pick(&self, x: u32) -> Op {
        let mut upper = 0u32;
        let mut last = Op::Send;
        for op in Op::ALL {
            let w = self.weight(op);
            if w == 0 {
                continue;
            }
            upper += w;
            last = op;
            if x < upper {
                return op;
            }
        }
        last
    }
}

impl Default for Mix {
    fn default() -> Mix {
        Mix {
            weights: [80, 15, 5],
            total: 100,
        }
    }
}

impl FromStr for Mix {
    type Err = MixError;

    fn from_str(s: &str) -> Result<Mix, MixError> {
        let mut weights: [Option<u32>; 3] = [None; 3];
        let mut any = false;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            any = true;
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| MixError::NotAPair(part.to_string()))?;
            let (name, weight) = (name.trim(), weight.trim());
            let op = Op::ALL
                .into_iter()
                .find(|op| op.name().eq_ignore_ascii_case(name))
                .ok_or_else(|| MixError::UnknownOp(name.to_string()))?;
            let w = weight.parse::<u32>().map_err(|_| MixError::BadWeight {
                op: op.name().to_string(),
                weight: weight.to_string(),
            })?;
            let slot = &mut weights[op as usize];
            if slot.is_some() {
                return Err(MixError::Duplicate(op));
            }
            *slot = Some(w);
        }
        if !any {
            return Err(MixError::Empty);
        }
        let [send, read, topup] = weights.map(|w| w.unwrap_or(0));
        Mix::new(send, read, topup)
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = Op::ALL
            .into_iter()
            .map(|op| format!("{op}={}", self.weight(op)))
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl Serialize for Mix {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let map: BTreeMap<&str, u32> = Op::ALL
            .into_iter()
            .map(|op| (op.name(), self.weight(op)))
            .collect();
        map.serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_mixes() {
        let m: Mix = "send=80,read=15,topup=5".parse().unwrap();
        assert_eq!(m, Mix::default());
        assert_eq!(m.total(), 100);

        let m: Mix = " send = 1 , topup=0 ".parse().unwrap();
        assert_eq!(
            (m.weight(Op::Send), m.weight(Op::Read), m.weight(Op::Topup)),
            (1, 0, 0)
        );
        let m: Mix = "READ=3,".parse().unwrap();
        assert_eq!(m.weight(Op::Read), 3);
        assert_eq!(m.to_string(), "send=0,read=3,topup=0");
    }

    #[test]
    fn rejects_bad_mixes_with_the_reason() {
        let err = |s: &str| s.parse::<Mix>().unwrap_err();
        assert_eq!(err(""), MixError::Empty);
        assert_eq!(err(" , "), MixError::Empty);
        assert_eq!(err("send"), MixError::NotAPair("send".into()));
        assert_eq!(err("send=1,gift=2"), MixError::UnknownOp("gift".into()));
        assert_eq!(
            err("send=x"),
            MixError::BadWeight {
                op: "send".into(),
                weight: "x".into()
            }
        );
        assert!(matches!(err("send=-1"), MixError::BadWeight { .. }));
        assert!(matches!(err("send=1.5"), MixError::BadWeight { .. }));
        assert_eq!(err("send=0,read=0"), MixError::NoPositiveWeight);
        assert_eq!(err("send=1,send=2"), MixError::Duplicate(Op::Send));
        assert_eq!(err("send=4294967295,read=1"), MixError::TooLarge);
        // The messages are what a person sees on the command line.
        assert!(err("gift=1").to_string().contains("send, read and topup"));
    }

    #[test]
    fn pick_follows_the_weights() {
        let m = Mix::new(2, 0, 1).unwrap();
        assert_eq!(m.pick(0), Op::Send);
        assert_eq!(m.pick(1), Op::Send);
        assert_eq!(m.pick(2), Op::Topup);
        assert_eq!(m.pick(99), Op::Topup);

        let m = Mix::default();
        let mut counts = [0u32; 3];
        for x in 0..m.total() {
            counts[m.pick(x) as usize] += 1;
        }
        assert_eq!(counts, [80, 15, 5]);
    }

    #[test]
    fn serializes_as_a_map() {
        let json = serde_json::to_value(Mix::default()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"send": 80, "read": 15, "topup": 5})
        );
    }
}
