//! [`InlineQueue`]: a first-in first-out queue whose front element lives inline.

use std::collections::VecDeque;

/// A first-in first-out queue that keeps its front element inline and only the others in a
/// `VecDeque`.
///
/// A stream's outbox usually holds one head and one body chunk at a time (a small response
/// is one of each): inline, they cost no allocation, where a `VecDeque` allocates on its
/// first push, twice per small response.
pub(crate) struct InlineQueue<T> {
    front: Option<T>,
    /// The elements behind `front`; empty while `front` is `None`.
    rest: VecDeque<T>,
}

impl<T> Default for InlineQueue<T> {
    fn default() -> Self {
        InlineQueue {
            front: None,
            rest: VecDeque::new(),
        }
    }
}

impl<T> InlineQueue<T> {
    pub(crate) fn push_back(&mut self, value: T) {
        if self.front.is_none() {
            self.front = Some(value);
        } else {
            self.rest.push_back(value);
        }
    }

    pub(crate) fn pop_front(&mut self) -> Option<T> {
        let front = self.front.take();
        self.front = self.rest.pop_front();
        front
    }

    pub(crate) fn front(&self) -> Option<&T> {
        self.front.as_ref()
    }

    pub(crate) fn front_mut(&mut self) -> Option<&mut T> {
        self.front.as_mut()
    }

    pub(crate) fn back(&self) -> Option<&T> {
        self.rest.back().or(self.front.as_ref())
    }

    pub(crate) fn len(&self) -> usize {
        usize::from(self.front.is_some()) + self.rest.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.front.is_none()
    }

    pub(crate) fn clear(&mut self) {
        self.front = None;
        self.rest.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::InlineQueue;

    #[test]
    fn elements_leave_in_the_order_they_came_whatever_the_interleaving() {
        let mut queue = InlineQueue::default();
        let mut expected = std::collections::VecDeque::new();
        let mut next = 0;
        // Pushes and pops interleaved so the front is refilled from the rest and from an
        // empty queue alike.
        for round in 0..50 {
            for _ in 0..(round % 4) {
                queue.push_back(next);
                expected.push_back(next);
                next += 1;
            }
            assert_eq!(queue.len(), expected.len());
            assert_eq!(queue.is_empty(), expected.is_empty());
            assert_eq!(queue.front(), expected.front());
            assert_eq!(queue.back(), expected.back());
            for _ in 0..(round % 3) {
                assert_eq!(queue.pop_front(), expected.pop_front());
            }
        }
        if let Some(front) = queue.front_mut() {
            *front = -1;
            expected[0] = -1;
        }
        while let Some(value) = expected.pop_front() {
            assert_eq!(queue.pop_front(), Some(value));
        }
        assert_eq!(queue.pop_front(), None);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_cleared_queue_is_empty_and_takes_new_elements() {
        let mut queue = InlineQueue::default();
        for i in 0..5 {
            queue.push_back(i);
        }
        queue.clear();
        assert!(queue.is_empty());
        assert_eq!((queue.len(), queue.front(), queue.back()), (0, None, None));
        queue.push_back(7);
        queue.push_back(8);
        assert_eq!((queue.front(), queue.back()), (Some(&7), Some(&8)));
    }
}
