//! What one report to the control plane may carry. The control plane keeps reports in memory
//! and drops an entry beyond these bounds (`switchyard_control_plane::reports`); the router
//! clips what it sends to them ([`clip`]), so a client's oversized model name, request id or
//! tenant still has its decision recorded. One place for both sides.

/// Bytes of an id or name: request id, router, tenant, model, worker, lane detail, ledger key,
/// move fields.
pub const ID_BYTES: usize = 256;
/// Bytes of a free text: a decision's reason, an outcome's error.
pub const TEXT_BYTES: usize = 2048;
/// Candidates in one decision.
pub const CANDIDATES: usize = 64;
/// Ledger rows in one second's stats: lanes, pools and a router's bounded tenants, with room
/// for a newer router's larger bound.
pub const LEDGER_ROWS: usize = 256;
/// Moves one outcome may list (the policy allows at most 16 per generation).
pub const MOVES: usize = 16;
/// Front-door APIs in one second's stats (a router has ten; room for a newer one's more).
pub const APIS: usize = 32;

/// What marks a clipped string.
pub const CLIPPED: char = '…';

/// Clips `value` to at most `max` bytes on a char boundary, ending it with [`CLIPPED`] when
/// anything was cut. `max` must leave room for the mark (3 bytes).
pub fn clip(value: &mut String, max: usize) {
    if value.len() <= max {
        return;
    }
    let mut end = max.saturating_sub(CLIPPED.len_utf8());
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value.truncate(end);
    value.push(CLIPPED);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_on_a_char_boundary_and_marks_the_cut() {
        let mut short = "abc".to_string();
        clip(&mut short, 3);
        assert_eq!(short, "abc");
        let mut ascii = "abcdefgh".to_string();
        clip(&mut ascii, 5);
        assert_eq!(ascii, "ab…");
        // "é" is two bytes: the cut moves back to the boundary before it.
        let mut accented = "éééé".to_string();
        clip(&mut accented, 6);
        assert_eq!(accented, "é…");
        assert!(accented.len() <= 6);
    }
}
