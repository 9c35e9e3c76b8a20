//! Packing examples into rows of at most `seq_len` tokens.
//!
//! With `packing: true`, examples are laid end to end in input order: an example joins the
//! open row if it fits entirely, otherwise the open row is closed and the example starts a
//! new one. An example is never split across rows unless it alone is longer than `seq_len`.
//!
//! With `packing: false`, every example starts a new row and no other example joins it.
//!
//! # Examples longer than `seq_len`
//!
//! The open row is closed, then the example is cut at multiples of `seq_len` counted from its
//! first token (its BOS, if any): every full piece of `seq_len` tokens is a row of its own,
//! and the remainder (if any) becomes the open row, which later examples may join (with
//! packing) or not (without). No token is dropped and none is repeated.
//!
//! Rows are not padded: every row has between 1 and `seq_len` tokens; the last rows of a
//! split, and rows closed early, are shorter. A row's `example_id` is the record index of
//! the example its first token belongs to: the 0-based position of the record among all
//! records of all input files, in input order (blank lines are not records; bad records
//! are, so ids stay aligned with the input even when records are skipped).

use super::encode::Encoded;

/// One output row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PackedRow {
    pub ids: Vec<u32>,
    pub mask: Vec<bool>,
    pub example_id: u64,
}

/// Packs the examples of one split.
#[derive(Debug)]
pub(crate) struct Packer {
    seq_len: usize,
    packing: bool,
    open: Option<PackedRow>,
    /// Examples longer than `seq_len`, which had to be cut.
    pub cut_examples: u64,
}

impl Packer {
    pub(crate) fn new(seq_len: usize, packing: bool) -> Self {
        Packer {
            seq_len,
            packing,
            open: None,
            cut_examples: 0,
        }
    }

    /// Adds one example; completed rows are appended to `out`.
    pub(crate) fn push(&mut self, example_id: u64, example: Encoded, out: &mut Vec<PackedRow>) {
        let len = example.ids.len();
        if len == 0 {
            return;
        }
        if let Some(open) = &mut self.open {
            if self.packing && open.ids.len() + len <= self.seq_len {
                open.ids.extend_from_slice(&example.ids);
                open.mask.extend_from_slice(&example.mask);
                if open.ids.len() == self.seq_len {
                    self.close(out);
                }
                return;
            }
            self.close(out);
        }
        if len > self.seq_len {
            self.cut_examples += 1;
        }
        for (ids, mask) in example
            .ids
            .chunks(self.seq_len)
            .zip(example.mask.chunks(self.seq_len))
        {
            let row = PackedRow {
                ids: ids.to_vec(),
                mask: mask.to_vec(),
                example_id,
            };
            if ids.len() == self.seq_len {
                out.push(row);
            } else {
                self.open = Some(row);
            }
        }
    }

    /// Closes the open row, if any, into `out`.
    pub(crate) fn close(&mut self, out: &mut Vec<PackedRow>) {
        if let Some(row) = self.open.take() {
            out.push(row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An example of `len` tokens whose ids are `id * 100 + position`.
    fn ex(id: u32, len: u32) -> Encoded {
        Encoded {
            ids: (0..len).map(|p| id * 100 + p).collect(),
            mask: (0..len).map(|p| p % 2 == 0).collect(),
        }
    }

    fn pack(seq_len: usize, packing: bool, lens: &[u32]) -> Vec<PackedRow> {
        let mut p = Packer::new(seq_len, packing);
        let mut out = Vec::new();
        for (i, len) in lens.iter().enumerate() {
            p.push(i as u64, ex(i as u32, *len), &mut out);
        }
        p.close(&mut out);
        out
    }

    fn shape(rows: &[PackedRow]) -> Vec<(u64, Vec<u32>)> {
        rows.iter().map(|r| (r.example_id, r.ids.clone())).collect()
    }

    #[test]
    fn packs_whole_examples_in_order() {
        let rows = pack(5, true, &[2, 2, 2, 3, 5, 1]);
        assert_eq!(
            shape(&rows),
            vec![
                (0, vec![0, 1, 100, 101]),
                (2, vec![200, 201, 300, 301, 302]),
                (4, vec![400, 401, 402, 403, 404]),
                (5, vec![500]),
            ]
        );
        assert!(rows.iter().all(|r| r.ids.len() == r.mask.len()));
        assert_eq!(rows[0].mask, [true, false, true, false]);
    }

    #[test]
    fn never_splits_an_example_that_fits() {
        let lens: Vec<u32> = (0..200).map(|i| (i * 7 % 13) + 1).collect();
        let rows = pack(16, true, &lens);
        // Every example's tokens are contiguous within exactly one row.
        for (i, len) in lens.iter().enumerate() {
            let holders: Vec<&PackedRow> = rows
                .iter()
                .filter(|r| r.ids.contains(&(i as u32 * 100)))
                .collect();
            assert_eq!(holders.len(), 1, "example {i}");
            let row = &holders[0].ids;
            let start = row.iter().position(|t| *t == i as u32 * 100).unwrap();
            let expected: Vec<u32> = (0..*len).map(|p| i as u32 * 100 + p).collect();
            assert_eq!(&row[start..start + *len as usize], &expected[..]);
        }
        let total: usize = rows.iter().map(|r| r.ids.len()).sum();
        assert_eq!(total, lens.iter().sum::<u32>() as usize);
        assert!(rows.iter().all(|r| r.ids.len() <= 16));
    }

    #[test]
    fn long_examples_are_cut_at_multiples_of_seq_len() {
        let mut p = Packer::new(4, true);
        let mut rows = Vec::new();
        for (i, len) in [2u32, 10, 1].iter().enumerate() {
            p.push(i as u64, ex(i as u32, *len), &mut rows);
        }
        p.close(&mut rows);
        assert_eq!(
            shape(&rows),
            vec![
                (0, vec![0, 1]),
                (1, vec![100, 101, 102, 103]),
                (1, vec![104, 105, 106, 107]),
                (1, vec![108, 109, 200]),
            ]
        );
        assert_eq!(p.cut_examples, 1);
    }

    #[test]
    fn without_packing_each_example_starts_a_row() {
        let rows = pack(4, false, &[1, 1, 6]);
        assert_eq!(
            shape(&rows),
            vec![
                (0, vec![0]),
                (1, vec![100]),
                (2, vec![200, 201, 202, 203]),
                (2, vec![204, 205])
            ]
        );
    }
}
